"""Multi-adapter serving: throughput and latency against the number of distinct adapters, side by
side in one run.

    python benchmarks/serving.py                 # CPU: a small Llama shape
    python benchmarks/serving.py --size smollm2  # GPU: SmolLM2-135M's shape, bf16

Workload: --requests requests (random prompts of 16..48 tokens, --tokens generated tokens each,
EOS ignored), all submitted at once, spread evenly over D distinct LoRA adapters (r=8 on q, k,
v, o), for D in --adapters. Systems:

- ``peftjax mixed``: one engine, every adapter resident in the bank, rows of any adapters
  decoded together (continuous batching, --batch rows).
- ``peftjax swapping``: the same with a bank of --swap-slots adapters for D adapters (LRU
  swapping; only where D exceeds it), and with --registered adapters registered in all.
- ``peftjax one at a time``: the same engine, one adapter's requests at a time (what a server
  that cannot mix adapters does).
- ``merged model``: the engine over the plain base, no bank (one adapter merged into the
  weights; the upper bound).
- ``torch PEFT mixed``: PyTorch PEFT's mixed-batch inference (``generate(adapter_names=...)``)
  on the same model in static batches of --batch (transformers' generate has no continuous
  batching), greedy, KV cache on.

Reported: generated tokens/s over the whole workload (compiles excluded: each workload runs
once untimed, then --repeats times; the median run is reported), the ratio to the merged model,
time to first token and time per output token (p50/p99 over requests; peftjax only: a static
torch batch has no per-request timing) and slot loads (swaps). Printed, written to
benchmarks/results/serving_<size>_<device>.md and plotted to serving_<size>_<device>.png.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, dtype
    "cpu": dict(hidden=256, intermediate=704, layers=4, heads=8, kv_heads=4, vocab=8192,
                dtype="float32"),
    "smollm2": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152,
                    dtype="bfloat16"),
    "tiny": dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128,
                 dtype="float32"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(s: dict, root: str, n_adapters: int, seed: int = 0) -> tuple[str, list[str]]:
    """A random Llama of shape ``s`` and ``n_adapters`` random LoRA adapters (PEFT format)."""
    import peft
    import torch
    import transformers

    from train_step import hf_config
    torch.manual_seed(seed)
    base_dir = os.path.join(root, "base")
    hf = transformers.LlamaForCausalLM(hf_config({**s, "seq": 2048}))
    hf.save_pretrained(base_dir)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    dirs = []
    for i in range(n_adapters):  # new random factors each time (the base stays the same)
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        d = os.path.join(root, f"adapter_{i:03d}")
        pm.save_pretrained(d)
        dirs.append(d)
    return base_dir, dirs


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, rs.randint(16, 49)).tolist() for _ in range(n)]


def percentile(xs, q):
    import numpy as np
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_engine(engine, prompts, adapters, tokens, *, sequential=False) -> dict:
    """Runs the workload through ``engine`` (all at once, or one adapter's requests at a time);
    returns throughput and latency figures."""
    from peftjax.serving import Request
    reqs = [Request(prompt=p, adapter=a, max_tokens=tokens) for p, a in zip(prompts, adapters)]
    loads0 = engine.bank.loads
    t0 = time.perf_counter()
    if sequential:
        for name in dict.fromkeys(adapters):
            engine.generate([r for r in reqs if r.adapter == name])
    else:
        engine.generate(reqs)
    wall = time.perf_counter() - t0
    ttft = [r.first_token - t0 for r in reqs]
    tpot = [(r.finished - r.first_token) / max(len(r.tokens) - 1, 1) for r in reqs]
    generated = sum(len(r.tokens) for r in reqs)
    return dict(tokens_s=generated / wall, wall=wall, ttft50=percentile(ttft, 50),
                ttft99=percentile(ttft, 99), tpot50=percentile(tpot, 50),
                tpot99=percentile(tpot, 99), swaps=engine.bank.loads - loads0)


def run_torch(s, base_dir, dirs, prompts, adapters, tokens, batch, repeats) -> dict:
    import peft
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, s["dtype"])
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=dtype)
    names = sorted(set(adapters))
    pm = peft.PeftModel.from_pretrained(model, dirs[int(names[0].split("_")[1])],
                                        adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(dirs[int(n.split("_")[1])], adapter_name=n)
    pm.eval()

    def batches():
        for i in range(0, len(prompts), batch):
            rows, names_b = prompts[i:i + batch], adapters[i:i + batch]
            T = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), T), dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for j, r in enumerate(rows):  # left padding, as generation needs
                ids[j, T - len(r):], mask[j, T - len(r):] = torch.tensor(r), 1
            yield ids, mask, names_b

    def go(limit=None):
        n = 0
        for k, (ids, mask, names_b) in enumerate(batches()):
            if limit is not None and k >= limit:
                break
            with torch.no_grad():
                out = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names_b,
                                  max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, pad_token_id=0)
            n += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        return n
    go(limit=1)  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generated = go()
        wall = time.perf_counter() - t0
        runs.append(dict(tokens_s=generated / wall, wall=wall))
    return sorted(runs, key=lambda r: r["tokens_s"])[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="cpu", choices=sorted(SIZES))
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16, 64],
                    help="distinct adapters in the workload")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--batch", type=int, default=16, help="rows decoded together")
    ap.add_argument("--swap-slots", type=int, default=8,
                    help="device bank size (adapters) of the swapping runs")
    ap.add_argument("--registered", type=int, default=256,
                    help="adapters registered for the many-adapters swapping run (0: skip)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measured runs per case (the median is reported)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch PEFT")
    ap.add_argument("--out", default=None, help="table path (default: benchmarks/results/...)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from peftjax.models import from_pretrained
    from peftjax.serving import Engine

    s = SIZES[args.size]
    device = jax.devices()[0].platform
    n_max = max(max(args.adapters), args.registered)
    root = tempfile.mkdtemp(prefix="peftjax_serving_")
    print(f"building the model and {n_max} adapters in {root} ...", flush=True)
    base_dir, dirs = build(s, root, n_max)
    base = from_pretrained(base_dir, dtype=jnp.dtype(s["dtype"]), progress=False)
    prompts = workload(args.requests, s["vocab"])
    max_len = 64 + args.tokens
    kw = dict(max_batch=args.batch, max_len=max_len, bucket=16)
    rows = []

    def record(system, d, slots, res):
        rows.append(dict(system=system, distinct=d, slots=slots, **res))
        print(f"{system:24s} D={d:<4d} slots={slots!s:>5s} {res['tokens_s']:9.1f} tok/s",
              flush=True)

    def timed(engine, adapters, sequential=False):
        """The workload once to compile every program it needs (and fill the bank), then
        --repeats measured runs: the one with the median throughput."""
        run_engine(engine, prompts, adapters, args.tokens, sequential=sequential)
        runs = sorted((run_engine(engine, prompts, adapters, args.tokens, sequential=sequential)
                       for _ in range(args.repeats)), key=lambda r: r["tokens_s"])
        return runs[len(runs) // 2]

    merged = Engine(base, targets=[], **kw)
    record("merged model", 1, "-", timed(merged, [None] * len(prompts)))
    del merged
    for d in args.adapters:
        names = [f"a_{i:03d}" for i in range(d)]
        adapters = [names[i % d] for i in range(len(prompts))]
        engine = Engine(base, adapters={n: dirs[i] for i, n in enumerate(names)},
                        bank_slots=d + 1, **kw)
        record("peftjax mixed", d, str(d), timed(engine, adapters))
        record("peftjax one at a time", d, str(d), timed(engine, adapters, sequential=True))
        del engine
        if d > args.swap_slots:
            engine = Engine(base, adapters={n: dirs[i] for i, n in enumerate(names)},
                            bank_slots=args.swap_slots + 1, **kw)
            record("peftjax swapping", d, str(args.swap_slots), timed(engine, adapters))
            del engine
        if not args.no_torch:
            record("torch PEFT mixed", d, "-", run_torch(s, base_dir, dirs, prompts, adapters,
                                                         args.tokens, args.batch, args.repeats))
    if args.registered:
        names = [f"a_{i:03d}" for i in range(args.registered)]
        engine = Engine(base, targets=TARGETS, max_rank=8, bank_slots=args.swap_slots + 1,
                        **kw)
        for i, n in enumerate(names):
            engine.register(n, dirs[i])
        adapters = [names[(i * 37) % len(names)] for i in range(len(prompts))]
        record(f"peftjax swapping ({args.registered} registered)",
               len(set(adapters)), str(args.swap_slots), timed(engine, adapters))
        del engine
    top = rows[0]["tokens_s"]
    for r in rows:
        r["vs_merged"] = r["tokens_s"] / top

    def cell(r, k, fmt):
        return format(r[k], fmt) if k in r else "-"
    lines = [
        f"# Multi-adapter serving ({args.size} shape, {device}, {s['dtype']})",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, jax "
        f"{jax.__version__}, median of {args.repeats} runs; {args.requests} requests of 16..48 "
        f"prompt tokens, {args.tokens} "
        f"generated tokens each (EOS ignored), submitted at once; {args.batch} rows decoded "
        f"together; LoRA r=8 on {', '.join(TARGETS)}; model: hidden {s['hidden']}, "
        f"{s['layers']} layers, vocab {s['vocab']}. Latencies in ms (peftjax only).",
        "",
        "| system | distinct adapters | device slots | tokens/s | x merged | TTFT p50 | TTFT p99 "
        "| TPOT p50 | TPOT p99 | slot loads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = {k: r[k] * 1e3 for k in ("ttft50", "ttft99", "tpot50", "tpot99") if k in r}
        lines.append(f"| {r['system']} | {r['distinct']} | {r['slots']} | {r['tokens_s']:,.1f} | "
                     f"{r['vs_merged']:.2f} | " + " | ".join(
                         format(ms[k], ".1f") if k in ms else "-"
                         for k in ("ttft50", "ttft99", "tpot50", "tpot99")) +
                     f" | {cell(r, 'swaps', 'd')} |")
    mixed = {r["distinct"]: r["tokens_s"] for r in rows if r["system"] == "peftjax mixed"}
    torch_mixed = {r["distinct"]: r["tokens_s"] for r in rows
                   if r["system"] == "torch PEFT mixed"}
    lines += ["", "Mixed batch vs the merged model / vs PyTorch PEFT's mixed batch: " + "; ".join(
        f"D={d}: {mixed[d] / top:.2f}x" + (f" / {mixed[d] / torch_mixed[d]:.2f}x"
                                           if d in torch_mixed else "")
        for d in sorted(mixed))]
    text = "\n".join(lines) + "\n"
    print(text)
    from _results import write_result
    out = write_result(text, args.out, f"serving_{args.size}_{device}")
    plot(rows, out.removesuffix(".md") + ".png", f"{args.size} shape, {device}")
    print(f"wrote {out} and the plot beside it")


def plot(rows, path, title) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for system in ("peftjax mixed", "peftjax one at a time", "peftjax swapping",
                   "torch PEFT mixed"):
        pts = sorted((r["distinct"], r["tokens_s"]) for r in rows if r["system"] == system)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=system)
    merged = next(r["tokens_s"] for r in rows if r["system"] == "merged model")
    ax.axhline(merged, color="gray", linestyle="--", label="merged model (upper bound)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the workload")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"Multi-adapter serving ({title})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
