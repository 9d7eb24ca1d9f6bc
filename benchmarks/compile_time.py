"""Compile time of the train step with the blocks unrolled and scanned (``train.scan_layers``),
side by side in one run, on abstract shapes (no weights: runs on any machine).

    python benchmarks/compile_time.py                     # TinyLlama-1.1B and Llama-3-8B shapes
    python benchmarks/compile_time.py --sizes 8b --plans lora,qlora

For each model shape and plan (LoRA r=16 on all linear layers over bf16 weights, or QLoRA over
NF4; batch 1 x 2048 tokens, full remat, AdamW: ``configs/memory/``'s recipes) the train step is
lowered and compiled by ``peftjax.train.dry_run`` in a process of its own (the persistent
compilation cache off, so nothing is reused), once with the blocks unrolled and once scanned.
Reported: the lowering + compile seconds, the ratio, and XLA's temporaries and total buffer
size (scanned, the frozen weights are held stacked as runs hold them, ``ScanLayout``). XLA:CPU
uses its memory-minimising scheduler (the planner's setting). The table is printed and written
to benchmarks/results/compile_time_<backend>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

from _results import report, run_case, write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    # TinyLlama-1.1B
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # Llama-3-8B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               rope_theta=500000.0),
    # keeps the script runnable in the test suite
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}
PLANS = {"lora": "llama2-7b_lora.yaml", "qlora": "llama2-7b_qlora.yaml"}


def run_one(size: str, plan: str, scan: bool, seq: int) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    from peftjax.config import load_config
    from peftjax.train import dry_run

    with open(os.path.join(REPO, "configs", "memory", "llama-2-7b-hf", "config.json")) as f:
        config = {**json.load(f), **SHAPES[size]}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        cfg = load_config(os.path.join(REPO, "configs", "memory", PLANS[plan]),
                          [f"model.path={tmp}", f"data.max_length={seq}", f"data.buckets=[{seq}]",
                           f"train.scan_layers={'true' if scan else 'false'}"])
        r = dry_run(cfg)
    return {"compile_s": r["compile_seconds"], "temp": r["temp_bytes"],
            "total": r["total_bytes"], "layers": config["num_hidden_layers"], "backend": r["backend"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--plans", default="lora")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=None, help="table file (default benchmarks/results/...)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process: size,plan,scan
    args = ap.parse_args()
    if args.case:
        size, plan, scan = args.case.split(",")
        report(run_one(size, plan, scan == "scan", args.seq))
        return
    rows = []
    for size in args.sizes.split(","):
        if size not in SHAPES:
            sys.exit(f"unknown size {size!r}; choose from {', '.join(SHAPES)}")
        for plan in args.plans.split(","):
            if plan not in PLANS:
                sys.exit(f"unknown plan {plan!r}; choose from {', '.join(PLANS)}")
            got = {}
            for mode in ("unrolled", "scan"):
                got[mode] = run_case(__file__, "--case", f"{size},{plan},{mode}",
                                     "--seq", str(args.seq))
                print(f"{size} {plan} {mode}: {got[mode]['compile_s']} s", flush=True)
            rows.append((size, plan, got))
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    backend = rows[0][2]["scan"]["backend"]
    lines = [f"Train-step compile time (`peftjax.train.dry_run`: lower + compile, abstract "
             f"shapes), batch 1 x {args.seq}, remat full, blocks unrolled vs scanned "
             f"(`train.scan_layers`); XLA {backend}, {os.cpu_count()} CPU cores; "
             f"{datetime.date.today()}, {platform.node() or 'host'}. GiB.", "",
             "| shape | plan | layers | compile s, unrolled | compile s, scanned | speed-up | "
             "temporaries, unrolled | temporaries, scanned | total, unrolled | total, scanned |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size, plan, got in rows:
        u, s = got["unrolled"], got["scan"]
        lines.append(f"| {size} | {plan} | {u['layers']} | {u['compile_s']:.1f} | "
                     f"{s['compile_s']:.1f} | {u['compile_s'] / max(s['compile_s'], 0.05):.2f}x | "
                     f"{gib(u['temp'])} | {gib(s['temp'])} | {gib(u['total'])} | "
                     f"{gib(s['total'])} |")
    text = "\n".join(lines)
    print(text)
    print(f"written to {write_result(text, args.out, f'compile_time_{backend}')}")


if __name__ == "__main__":
    main()
