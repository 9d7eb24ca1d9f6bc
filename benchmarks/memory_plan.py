"""What each layer costs in the train step's memory with full remat: the planner
(``peftjax memory``) at a few depths of the same shape, side by side in one run.

    python benchmarks/memory_plan.py                  # Llama-2-7B shapes (configs/memory/)
    python benchmarks/memory_plan.py --depths 2,4,32  # also the whole 32-layer model

For each plan in configs/memory/ (LoRA r=16 all-linear over bf16 weights, the same with LoRA-FA,
QLoRA over NF4 + double quantization, full fine-tuning with float32 master weights; batch 1,
``train.remat: full``) and each sequence length, the train step is compiled on abstract shapes (no weights) with
``num_hidden_layers`` set to each depth, and XLA's buffer sizes are split as ``peftjax memory``
splits them. Reported: activations + temporaries per depth (the temporaries less the gradients;
"-" where XLA holds the gradients in less than their parameters' size, as for full fine-tuning,
whose float32 weights get bf16 gradients), the growth per added layer (what remat should bring
down to about one block input, [1, T, hidden] in bf16), and XLA's temporaries and the total at
the largest depth. XLA:CPU's memory-minimising scheduler is used (the planner's setting). The
table is printed and written to benchmarks/results/memory_plan_<size>_<backend>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

from _results import write_result

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = {"lora": ("llama2-7b_lora.yaml", []), "lora_fa": ("llama2-7b_lora.yaml", ["peft.lora_fa=true"]),
         "qlora": ("llama2-7b_qlora.yaml", []), "full": ("llama2-7b_full.yaml", [])}
SHAPES = {
    "7b": {},  # configs/memory/llama-2-7b-hf/config.json as it is
    # keeps the script runnable in the test suite
    "tiny": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


def plan(name: str, shape: dict, layers: int, seq: int, directory: str) -> dict:
    from peftjax.config import load_config
    from peftjax.train._plan import memory_plan

    with open(os.path.join(REPO, "configs", "memory", "llama-2-7b-hf", "config.json")) as f:
        config = {**json.load(f), **shape, "num_hidden_layers": layers}
    model_dir = os.path.join(directory, f"{name}-{layers}-{seq}")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f)
    path, overrides = PLANS[name]
    cfg = load_config(os.path.join(REPO, "configs", "memory", path),
                      [f"model.path={model_dir}", f"data.max_length={seq}",
                       f"data.buckets=[{seq}]", *overrides])
    r = memory_plan(cfg)
    # the planner's split (temporaries less the gradients) does not apply where XLA holds the
    # gradients in less than their parameters' size (full fine-tuning: bf16 for f32 weights)
    split = r["temp_bytes"] >= r["trainable_bytes"]
    return {"activations": r["activation_bytes"] if split else None, "total": r["total_bytes"],
            "temp": r["temp_bytes"], "hidden": config["hidden_size"],
            "compile_s": r["compile_seconds"]}


UNIT = {"7b": ("GiB", 2**30), "tiny": ("MiB", 2**20)}


def _fmt(b: float | None, size: str) -> str:
    return "-" if b is None else f"{b / UNIT[size][1]:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--plans", default="lora,lora_fa,qlora,full")
    ap.add_argument("--seqs", default="256,2048")
    ap.add_argument("--depths", default="2,4", help="layer counts (the first two give the "
                    "growth per layer; the last the total)")
    ap.add_argument("--out", default=None, help="table file (default benchmarks/results/...)")
    args = ap.parse_args()
    import jax

    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.plans.split(","):
            if name not in PLANS:
                sys.exit(f"unknown plan {name!r}; choose from {', '.join(PLANS)}")
            for seq in (int(s) for s in args.seqs.split(",")):
                got = {d: plan(name, SHAPES[args.size], d, seq, tmp) for d in depths}
                print(f"{name} seq {seq}: " + ", ".join(
                    f"{d} layers {_fmt(g['activations'], args.size)} {UNIT[args.size][0]}"
                    for d, g in got.items()),
                    flush=True)
                a, b = depths[0], depths[1]
                per_layer = (None if got[a]["activations"] is None or got[b]["activations"] is None
                             else (got[b]["activations"] - got[a]["activations"]) / (b - a))
                block_input = seq * got[a]["hidden"] * 2
                rows.append((name, seq, got, per_layer, block_input))
    cols = " | ".join(f"activations, {d} layers" for d in depths)
    lines = [f"Train-step memory plan (`peftjax memory`), Llama-2-7B shapes ({args.size}), batch 1, "
             f"remat full; XLA {jax.default_backend()} with the memory-minimising scheduler; "
             f"{datetime.date.today()}, {platform.node() or 'host'}. {UNIT[args.size][0]}.", "",
             f"| plan | seq | {cols} | per added layer | block input (bf16) | "
             f"temporaries at {depths[-1]} layers | total at {depths[-1]} layers |",
             "|---|---|" + "---|" * len(depths) + "---|---|---|---|"]
    for name, seq, got, per_layer, block_input in rows:
        acts = " | ".join(_fmt(g["activations"], args.size) for g in got.values())
        lines.append(f"| {name} | {seq} | {acts} | {_fmt(per_layer, args.size)} | "
                     f"{_fmt(block_input, args.size)} | "
                     f"{_fmt(got[depths[-1]]['temp'], args.size)} | "
                     f"{_fmt(got[depths[-1]]['total'], args.size)} |")
    text = "\n".join(lines)
    print(text)
    path = write_result(text, args.out, f"memory_plan_{args.size}_{jax.default_backend()}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
