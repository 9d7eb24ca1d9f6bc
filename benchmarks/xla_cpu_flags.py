"""XLA:CPU options of the installed jaxlib on the train step: which ones make it faster, and
do they keep its numbers? Side by side in one run.

    python benchmarks/xla_cpu_flags.py                  # CPU Llama shape of train_step.py
    python benchmarks/xla_cpu_flags.py --case peftjax_full --steps 5
    python benchmarks/xla_cpu_flags.py --settings default --try=--xla_cpu_prefer_vector_width=512

Each setting runs ``benchmarks/train_step.py``'s case (default ``peftjax_lora``) in a process
of its own with the setting's flags added to ``XLA_FLAGS``; PyTorch PEFT's LoRA step runs
once beside them as the yardstick. A setting the jaxlib rejects is reported as such, not
skipped. Reported: median step ms, speed against the default flags and against PyTorch PEFT,
the loss after the timed steps and its difference from the default flags' (same weights, same
batches: a setting that changes the numbers shows here), compile seconds. The table is
printed and written to ``benchmarks/results/xla_cpu_flags_<size>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys

from _results import run_case, write_result

HERE = os.path.dirname(os.path.abspath(__file__))

# (label, flags): the library and fusion switches of jaxlib 0.10's XLA:CPU
SETTINGS = [
    ("default", ""),
    ("no XNNPACK", "--xla_cpu_use_xnnpack=false"),
    ("XNNPACK dots", "--xla_cpu_experimental_xnn_fusion_type=dot"),
    ("XNNPACK dots + elementwise", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise"),
    ("XNNPACK graph fusion (greedy)",
     "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    ("YNNPACK dots", "--xla_cpu_experimental_ynn_fusion_type=dot"),
    ("oneDNN dots", "--xla_cpu_experimental_onednn_fusion_type=dot"),
    ("oneDNN custom calls", "--xla_cpu_experimental_onednn_custom_call=true"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("one Eigen thread", "--xla_cpu_multi_thread_eigen=false"),
]


def run_setting(case: str, flags: str, args) -> dict:
    """One case with ``flags`` added to XLA_FLAGS; ``{"error": ...}`` if it failed."""
    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = " ".join(f for f in (before, flags) if f)
    try:
        return run_case(os.path.join(HERE, "train_step.py"), "--case", case, "--size",
                        args.size, "--steps", str(args.steps), "--warmup", str(args.warmup))
    except SystemExit as e:  # run_case exits with the child's stderr
        lines = [ln for ln in str(e.code).splitlines() if ln.strip()]
        last = re.sub(r"^[FEWI]\d{4} [\d:.]+\s+\d+ \S+\] ", "", lines[-1] if lines else "failed")
        return {"error": last[:160]}  # without the log line's prefix
    finally:
        if before is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = before


def _combine(results: list) -> dict:
    """One setting's processes: the median of their median step times (the first error if
    any failed); ``step_ms_all`` keeps each."""
    bad = [r for r in results if "error" in r]
    if bad:
        return bad[0]
    out = dict(results[0])
    out["step_s"] = statistics.median(r["step_s"] for r in results)
    out["steps_s"] = [r["step_s"] for r in results]
    return out


def table(rows: list, torch: dict | None, case: str, args) -> str:
    default = next((r for label, _, r in rows if label == "default" and "error" not in r), None)
    lines = [f"XLA:CPU options on train_step.py's `{case}` case (size `{args.size}`), median of "
             f"{args.steps} steps after {args.warmup} warmup in each of {args.repeats} processes "
             f"per setting (step ms: the median of the processes' medians; each in "
             f"brackets); {datetime.date.today()}, "
             f"{os.cpu_count()} CPU cores ({platform.machine()}).", "",
             "| setting | XLA_FLAGS | step ms | vs default | vs PyTorch PEFT LoRA | loss | "
             "loss - default's | compile s |", "|---|---|---|---|---|---|---|---|"]
    for label, flags, r in rows:
        if "error" in r:
            lines.append(f"| {label} | `{flags}` | rejected: {r['error']} | - | - | - | - | - |")
            continue
        vs_default = f"{default['step_s'] / r['step_s']:.2f}x" if default else "-"
        vs_torch = f"{torch['step_s'] / r['step_s']:.2f}x" if torch else "-"
        diff = f"{r['loss'] - default['loss']:+.2e}" if default else "-"
        each = "/".join(f"{1000 * t:.0f}" for t in r["steps_s"])
        lines.append(f"| {label} | `{flags or '(none)'}` | {1000 * r['step_s']:.1f} ({each}) | "
                     f"{vs_default} | {vs_torch} | {r['loss']:.6f} | {diff} | "
                     f"{r['compile_s']:.1f} |")
    if torch:
        lines += ["", f"PyTorch PEFT LoRA (same shape, {torch['device']}): "
                      f"{1000 * torch['step_s']:.1f} ms a step, loss {torch['loss']:.6f}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="cpu", help="a train_step.py size (default cpu)")
    ap.add_argument("--case", default="peftjax_lora", choices=["peftjax_lora", "peftjax_full"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="processes per setting")
    ap.add_argument("--settings", help="comma-separated labels (default: all)")
    ap.add_argument("--try", dest="tries", action="append", default=[], metavar="FLAGS",
                    help="another setting: XLA flags to add, as --try=FLAGS (repeatable)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch PEFT yardstick")
    ap.add_argument("--out", default=None, help="table file (default benchmarks/results/...)")
    args = ap.parse_args()
    chosen = SETTINGS
    if args.settings:
        known = {label: flags for label, flags in SETTINGS}
        wanted = args.settings.split(",")
        unknown = [w for w in wanted if w not in known]
        if unknown:
            sys.exit(f"unknown setting {unknown[0]!r}; choose from: "
                     + ", ".join(label for label, _ in SETTINGS))
        chosen = [(w, known[w]) for w in wanted]
    chosen = chosen + [(f"--try {i}", flags) for i, flags in enumerate(args.tries, 1)]
    # rounds: every setting once per round, each round starting one setting later, so no
    # setting always runs first (this machine's step times drift by ~25% between processes)
    runs = {label: [] for label, _ in chosen}
    for rnd in range(args.repeats):
        for j in range(len(chosen)):
            label, flags = chosen[(j + rnd) % len(chosen)]
            print(f"[round {rnd + 1}/{args.repeats}] {args.case} with {label} ...", flush=True)
            runs[label].append(run_setting(args.case, flags, args))
    rows = [(label, flags, _combine(runs[label])) for label, flags in chosen]
    torch = None
    if not args.no_torch:
        print("running torch_peft_lora ...", flush=True)
        torch = _combine([run_setting("torch_peft_lora", "", args)
                          for _ in range(args.repeats)])
        torch = None if "error" in torch else torch
    text = table(rows, torch, args.case, args)
    print(text)
    print(f"written to {write_result(text, args.out, f'xla_cpu_flags_{args.size}')}")


if __name__ == "__main__":
    main()
