"""4-bit (NF4) dequantize-matmul benchmark: y = x @ W.T with W stored in 4 bits.

    python benchmarks/nf4_matmul.py                 # GPU/TPU: Llama-8B projection shapes
    python benchmarks/nf4_matmul.py --size cpu      # the default on CPU: small shapes
    python benchmarks/nf4_matmul.py --size tiny     # seconds (what the test runs)

Methods, all computing the same function (the dense weight is the dequantized 4-bit one):
  xla_dense     jnp.dot with W dense in the compute dtype (bf16 on GPU/TPU, f32 on CPU)
  xla_dequant   peftjax's default path: nf4_matmul(impl="xla"), dequantize then dot
  pallas        nf4_matmul(impl="pallas"), dequantization inside the tile (GPU/TPU only)
  bnb           bitsandbytes.matmul_4bit (PyTorch), NF4 + double quant, when installed

For each weight shape W [N, K] and batch M: median time, TFLOP/s (2MNK / t), GB/s (the fewest
bytes the method must move: x, its weight storage, y, each once), % of the measured copy
bandwidth (read + write of a large array), the speed-up over xla_dense, and the relative error
||y - y_ref|| / ||y_ref|| against a float32 HIGHEST-precision reference. Writes the table to
benchmarks/results/nf4_matmul_<size>_<device>.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels_pallas.nf4_matmul import dequantize_NxK, nf4_matmul  # noqa: E402
from peftjax.quant import NF4_CODE, quantize_4bit  # noqa: E402

BLOCKSIZE = 64
# W [N, K] = [out, in]: Llama-3-8B's q/o projections, gate/up, down
SIZES = {
    "gpu": dict(shapes=[(4096, 4096), (14336, 4096), (4096, 14336)], ms=[1, 8, 16, 4096, 8192],
                copy_mib=1024, sets=3),
    "cpu": dict(shapes=[(1024, 1024), (2048, 1024), (1024, 2048)], ms=[1, 8, 16, 512],
                copy_mib=128, sets=2),
    "tiny": dict(shapes=[(256, 128)], ms=[1, 16], copy_mib=8, sets=2),
}
DECODE_M = 16  # M at or below this is decode (bandwidth-bound); above, training (compute-bound)


def timed(fn, inputs, iters: int, repeats: int, sync) -> float:
    """Median seconds per call: ``repeats`` loops of ``iters`` calls, rotating over the input
    sets (so repeated calls do not measure the cache), synchronised once per loop."""
    sync(fn(*inputs[0]))  # warm-up / compile
    sync(fn(*inputs[-1]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*inputs[i % len(inputs)])
        sync(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def jax_sync(x):
    jax.block_until_ready(x)


def copy_bandwidth(mib: int, dtype) -> float:
    """Bytes/s of an elementwise pass over a large array (one read + one write per element)."""
    n = mib * 2**20 // jnp.dtype(dtype).itemsize
    arrays = [(jnp.full((n,), i + 1, dtype),) for i in range(2)]
    f = jax.jit(lambda a: a * 2)
    t = timed(f, arrays, iters=10, repeats=5, sync=jax_sync)
    return 2 * n * jnp.dtype(dtype).itemsize / t


def bnb_runner(w_sets, x_sets, blocksize):
    """(callable, inputs, sync, weight bytes, note) for bitsandbytes, or a reason it cannot run."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        import torch
    except ImportError as e:
        return f"not installed ({e.name})"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if jax.default_backend() != "cpu" and dev == "cpu":
        return "PyTorch has no CUDA here"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[str(x_sets[0].dtype)]
    inputs, wbytes = [], 0
    for w, x in zip(w_sets, x_sets):
        wt = torch.from_numpy(np.asarray(w, np.float32)).to(dev, tdtype)
        packed, state = F.quantize_4bit(wt, blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=True)
        xt = torch.from_numpy(np.asarray(x, np.float32)).to(dev, tdtype)
        inputs.append((xt, packed.t(), state))
        wbytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()

    def fn(x, packed_t, state):
        return bnb.matmul_4bit(x, packed_t, quant_state=state)

    def sync(out):
        if dev == "cuda":
            torch.cuda.synchronize()

    return fn, inputs, sync, wbytes, dev


def run(args) -> tuple[list[dict], dict]:
    s = SIZES[args.size]
    backend = jax.default_backend()
    dtype = jnp.bfloat16 if backend in ("gpu", "tpu") else jnp.float32
    dsize = jnp.dtype(dtype).itemsize
    bw = copy_bandwidth(s["copy_mib"], dtype)
    info = {"backend": backend, "device": jax.devices()[0].device_kind, "dtype": jnp.dtype(dtype).name,
            "copy_gbs": bw / 1e9, "jax": jax.__version__}
    methods = args.methods.split(",")
    code = np.asarray(NF4_CODE, np.float32)
    rows = []
    rng = np.random.default_rng(0)
    for n, k in s["shapes"]:
        # weights: normal(0, 0.02), the scale of initialised projections; quantized by peftjax
        w_sets, packed_sets, scale_sets = [], [], []
        for _ in range(s["sets"]):
            w = rng.standard_normal((n, k), np.float32) * 0.02
            packed, state = quantize_4bit(jnp.asarray(w), quant_type="nf4", blocksize=BLOCKSIZE,
                                          double_quant=False)
            packed = packed.reshape(n, k // 2)
            scales = state.absmax.reshape(n, k // BLOCKSIZE).astype(jnp.float32)
            packed_sets.append(packed)
            scale_sets.append(scales)
            w_sets.append(dequantize_NxK(packed, scales, code, jnp.float32))  # what 4 bits hold
        q_bytes = n * k // 2 + 4 * n * k // BLOCKSIZE
        for m in s["ms"]:
            x_sets = [jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
                      for _ in range(s["sets"])]
            ref = jnp.dot(x_sets[0].astype(jnp.float32), w_sets[0].T,
                          precision=jax.lax.Precision.HIGHEST)
            flops = 2.0 * m * n * k
            io = (m * k + m * n) * dsize
            iters = args.iters or (200 if m <= DECODE_M else 20)
            results = {}
            for method in methods:
                row = {"shape": f"{n}x{k}", "m": m, "method": method, "note": ""}
                try:
                    if method == "xla_dense":
                        fn = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32
                                                          ).astype(x.dtype))
                        inputs = [(x, w.astype(dtype)) for x, w in zip(x_sets, w_sets)]
                        sync, wb = jax_sync, n * k * dsize
                    elif method in ("xla_dequant", "pallas"):
                        if method == "pallas" and backend == "cpu":
                            raise NotImplementedError("runs on GPU/TPU only (CPU: interpret mode, "
                                                      "tested, not timed)")
                        impl = "xla" if method == "xla_dequant" else "pallas"
                        fn = jax.jit(lambda x, p, sc, impl=impl: nf4_matmul(
                            x, p, sc, code=NF4_CODE, blocksize=BLOCKSIZE, dtype=dtype, impl=impl))
                        inputs = list(zip(x_sets, packed_sets, scale_sets))
                        sync, wb = jax_sync, q_bytes
                    elif method == "bnb":
                        got = bnb_runner(w_sets, x_sets, BLOCKSIZE)
                        if isinstance(got, str):
                            raise NotImplementedError(got)
                        fn, inputs, sync, wb, dev = got
                        row["note"] = f"{dev}; double quant (8-bit absmax)"
                    else:
                        raise ValueError(f"unknown method {method!r}")
                    t = timed(fn, inputs, iters, args.repeats, sync)
                    y = fn(*inputs[0])
                    y = np.asarray(y.float().cpu().numpy() if hasattr(y, "cpu") else
                                   jnp.asarray(y, jnp.float32))
                    err = float(np.linalg.norm(y - np.asarray(ref)) / np.linalg.norm(ref))
                    row.update(ms=t * 1e3, tflops=flops / t / 1e12, gbs=(io + wb) / t / 1e9,
                               pct_bw=100 * (io + wb) / t / bw, rel_err=err)
                    results[method] = t
                except NotImplementedError as e:
                    row["note"] = f"skipped: {e}"
                except Exception as e:  # a failing method is a row, not a crashed benchmark
                    row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
            for row in rows[-len(methods):]:
                if "ms" in row and "xla_dense" in results:
                    row["vs_dense"] = results["xla_dense"] / (row["ms"] / 1e3)
            print_rows(rows[-len(methods):])
    return rows, info


def fmt(row: dict) -> str:
    if "ms" not in row:
        return (f"| {row['shape']} | {row['m']} | {row['method']} | - | - | - | - | - | - | "
                f"{row['note']} |")
    return (f"| {row['shape']} | {row['m']} | {row['method']} | {row['ms']:.4g} | "
            f"{row['tflops']:.4g} | {row['gbs']:.4g} | {row['pct_bw']:.1f}% | "
            f"{row.get('vs_dense', float('nan')):.2f}x | {row['rel_err']:.1e} | {row['note']} |")


HEADER = ("| W [N x K] | M | method | ms | TFLOP/s | GB/s | % of copy BW | vs xla_dense | "
          "rel. err | note |\n|---|---|---|---|---|---|---|---|---|---|")


def print_rows(rows):
    for r in rows:
        print(fmt(r), flush=True)


def table(rows, info, args) -> str:
    today = datetime.date.today().isoformat()
    lines = [f"# nf4_matmul benchmark ({args.size})", "",
             f"{today}; device: {info['device']} ({info['backend']}), jax {info['jax']}, "
             f"Python {platform.python_version()}; compute dtype {info['dtype']}; NF4 blocksize "
             f"{BLOCKSIZE}; measured copy bandwidth {info['copy_gbs']:.1f} GB/s (read + write).",
             "", "Command: `python benchmarks/nf4_matmul.py --size " + args.size + "`", ""]
    if info["backend"] == "cpu":
        lines += ["On CPU the weights (a few MB) stay in the caches while the copy-bandwidth probe "
                  "streams from memory, so '% of copy BW' can exceed 100%; the CPU rows show the "
                  "script works and how the methods compare there, not the GPU targets.", ""]
    lines += [HEADER] + [fmt(r) for r in rows]
    dense = {(r["shape"], r["m"]): r for r in rows if r["method"] == "xla_dense" and "ms" in r}
    lines += ["", "Targets (issue 5, H100/H200): decode (M <= 16) >= 2.5x xla_dense and >= 70% of "
              "copy bandwidth; training (M >= 4096) >= 85% of the bf16 matmul rate (xla_dense's "
              "TFLOP/s at the same shape)."]
    if dense:
        best = {}
        for r in rows:
            if "ms" in r and r["method"] != "xla_dense":
                key = (r["shape"], r["m"])
                if key in dense and r["tflops"] > best.get(key, (0, ""))[0]:
                    best[key] = (r["tflops"], r["method"])
        lines += ["", "| W | M | fastest 4-bit method | % of xla_dense TFLOP/s |", "|---|---|---|---|"]
        for key, (tf, method) in best.items():
            lines.append(f"| {key[0]} | {key[1]} | {method} | {100 * tf / dense[key]['tflops']:.0f}% |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="default: gpu on GPU/TPU backends, cpu on CPU")
    ap.add_argument("--methods", default="xla_dense,xla_dequant,pallas,bnb")
    ap.add_argument("--iters", type=int, default=None, help="calls per timed loop")
    ap.add_argument("--repeats", type=int, default=5, help="timed loops (the median is reported)")
    ap.add_argument("--out", default=None, help="table file (default benchmarks/results/...)")
    args = ap.parse_args()
    args.size = args.size or ("cpu" if jax.default_backend() == "cpu" else "gpu")
    print(HEADER, flush=True)
    rows, info = run(args)
    text = table(rows, info, args)
    from _results import write_result
    out = write_result(text, args.out, f"nf4_matmul_{args.size}_{info['backend']}")
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
