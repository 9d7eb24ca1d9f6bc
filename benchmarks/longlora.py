"""LongLoRA's shifted sparse attention vs full attention: the LoRA train step at a long
sequence, side by side in one run.

    python benchmarks/longlora.py                # CPU: a small Llama shape at 4,096 tokens
    python benchmarks/longlora.py --size smollm2 # GPU: SmolLM2-135M's shape at 16,384 tokens

Cases (same random model, LoRA r=8 on q/k/v/o, AdamW, full remat off): full attention, and
S2-Attn with groups of 1/4 and 1/8 of the sequence (what ``procedure: {method: longlora}``
traces into the train step). Reported: XLA's compiled temporaries of the step (activations and
gradients), the median step time over --steps timed steps after one warm-up step, tokens/s,
and both as ratios to full attention. The table is printed and written to
benchmarks/results/longlora_<size>_<device>.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, batch, seq, dtype
    "cpu": dict(hidden=256, intermediate=704, layers=4, heads=8, kv_heads=4, vocab=8192,
                batch=1, seq=4096, dtype="float32"),
    "smollm2": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152,
                    batch=1, seq=16384, dtype="bfloat16"),
    "tiny": dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128,
                 batch=1, seq=64, dtype="float32"),
}
CASES = (("full attention", None), ("S2-Attn, groups of 1/4", 0.25),
         ("S2-Attn, groups of 1/8", 0.125))


def build(s: dict, directory: str):
    import torch
    import transformers

    from train_step import hf_config  # the same Llama config the train-step benchmark builds
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config(s)).save_pretrained(directory)


def run(s: dict, directory: str, steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from peftjax.models import from_pretrained
    from peftjax.procedures import LongLoraConfig
    from peftjax.train import OptimizerConfig, make_optimizer, make_train_step, split_model
    from peftjax.tuners import LoraConfig, get_peft_model
    dtype = jnp.dtype(s["dtype"])
    model = get_peft_model(from_pretrained(directory, dtype=dtype, progress=False),
                           LoraConfig(r=8, lora_alpha=16,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                           rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = split_model(model)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, s["vocab"], (s["batch"], s["seq"])))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    rows = []
    for name, ratio in CASES:
        ctx = None if ratio is None else LongLoraConfig(group_size_ratio=ratio).training_context
        step = make_train_step(graphdef, optimizer, task="causal_lm", context=ctx)
        tr = jax.tree.map(jnp.copy, trainable)
        st = optimizer.init(tr)
        t0 = time.perf_counter()
        compiled = step.lower(tr, st, frozen, batch, None).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        tr, st, m = compiled(tr, st, frozen, batch, None)  # warm-up
        jax.block_until_ready(m["loss"])
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tr, st, m = compiled(tr, st, frozen, batch, None)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append({"case": name, "temp_gib": None if temp is None else temp / 2**30,
                     "step_s": t, "tokens_s": s["batch"] * s["seq"] / t,
                     "compile_s": compile_s, "loss": float(m["loss"])})
    return rows


def table(rows: list[dict], s: dict, size: str, device: str) -> str:
    base = rows[0]
    lines = [f"# LongLoRA S2-Attn vs full attention: LoRA train step ({size}, {device})", "",
             f"{datetime.date.today()}; {platform.processor() or platform.machine()}; Llama "
             f"shape hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads "
             f"({s['kv_heads']} kv), batch {s['batch']} x {s['seq']} tokens, {s['dtype']}; "
             "LoRA r=8 on q/k/v/o; median step time.", "",
             "| case | step temporaries (GiB) | vs full | step (s) | tokens/s | speed vs full "
             "| compile (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = "n/a" if r["temp_gib"] is None else f"{r['temp_gib']:.3f}"
        mem_ratio = ("n/a" if r["temp_gib"] is None or not base["temp_gib"] else
                     f"{r['temp_gib'] / base['temp_gib']:.2f}x")
        lines.append(f"| {r['case']} | {mem} | {mem_ratio} | {r['step_s']:.3f} | "
                     f"{r['tokens_s']:,.0f} | {base['step_s'] / r['step_s']:.2f}x | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import tempfile

    import jax
    s = SIZES[args.size]
    device = jax.devices()[0].platform
    with tempfile.TemporaryDirectory() as d:
        build(s, d)
        rows = run(s, d, args.steps)
    text = table(rows, s, args.size, device)
    print(text)
    from _results import write_result
    write_result(text, args.out, f"longlora_{args.size}_{device}")


if __name__ == "__main__":
    main()
