"""The methods on real data: every method on the quickstart task and the seeds' where-to-adapt
study for LoRA, as mean +- std over seeds, with tables and plots.

    python benchmarks/methods.py                        # the full grid (hours on 2 CPU cores)
    python benchmarks/methods.py --budget small         # a reduced grid (~2.5 min; the tests)
    python benchmarks/methods.py --study methods --study rank    # some studies only
    python benchmarks/methods.py --task smollm2         # SmolLM2-135M sentiment (generation)
    python benchmarks/methods.py --no-train             # tables of the finished cases only

Tasks (real data, offline):
  minilm   the quickstart: all-MiniLM-L6-v2 classifying movie-review snippets by their human
           sentiment rating (vader:movie_reviews); accuracy on the 1,057 test snippets
  smollm2  SmolLM2-135M-Instruct answering "positive"/"negative" through its chat template
           (configs/smollm2_sentiment_*.yaml); greedy-generation accuracy on 300 test reviews

Studies (``--study``, repeatable; default all of the task's):
  methods     every method of the task, each at its shipped config's recipe, plus
              classifier-only and full fine-tuning
  layers      LoRA on the lower half / upper half / every other / all blocks
  modules     LoRA on attention only / feed-forward only / both
  rank        LoRA r in 1, 2, 4, 8, 16, 32 (alpha = 2r, the quickstart's ratio)
  trainables  beside LoRA: classifier only / classifier + pooler / + word embeddings
  recipe      the quickstart's recipe, then one change at a time: lr 1e-3, lr 5e-3, LoRA
              dropout 0.1 (turns the model's dropout on too), no weight decay, and the seeds'
              best (classifier + pooler, lr 1e-3, no dropout, no weight decay)
  memory      XLA's compiled memory of the LoRA step as the number of adapted blocks grows,
              with and without remat (compiles only, no training)

Each trained case (config + overrides + seed) runs ``peftjax.train.run_training`` in a process
of its own (clean peak RSS) and its result is kept in
``benchmarks/results/methods/<task>_<budget>/cases/<key>.json`` (the key digests the whole
resolved config, so a case shared by several studies trains once); a later run reuses those
files (``--fresh`` trains again), so the full grid can be run in parts (the finished cases are
committed) and its tables rebuilt without training (``--no-train``: what is finished so far,
naming what is not). Training is deterministic for a seed on a given machine and library set, so
a rerun reproduces every number except the times and memory (``--check CASE`` retrains one
case and compares). Seeds vary the adapter/head initialisation (``train.seed``) and the batch
order (``data.shuffle_seed``); the data split is fixed.

Writes ``methods_<task>_<budget>.md`` / ``.csv`` and plots (``*_params.png``, ``*_rank.png``,
``*_memory.png``) to ``benchmarks/results/``. Memory columns: XLA's compiled temporaries of one
train step at the largest bucket (``peftjax.train.dry_run``), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time

from _results import report, run_case, write_result

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = os.path.join(REPO, "configs")

# overrides every minilm case gets: no evaluations or checkpoints while training (the
# validation and test splits are evaluated once at the end), the same batching for all
_MINILM_COMMON = {"train.eval_every": None, "train.save_every": None, "eval.test_before": False,
                  "data.group_by_length": True, "train.log_every": 50}
_SMOLLM2_COMMON = {"train.eval_every": None, "train.save_every": None,
                   "eval.test_before": False}

_ATTENTION = r".*\.attention\.(self\.(query|key|value)|output\.dense)"
_FEED_FORWARD = r".*\.layer\.\d+\.(intermediate|output)\.dense"

# task -> study -> [(label, config file, overrides)]
GRID = {
    "minilm": {
        "methods": [
            ("classifier only", "quickstart_classifier_only.yaml", {}),
            ("full fine-tuning", "quickstart_full_finetune.yaml", {}),
            ("LoRA r=8", "quickstart.yaml", {}),
            ("DoRA r=8", "quickstart_dora.yaml", {}),
            ("LoRA-FA r=8", "quickstart_lora_fa.yaml", {}),
            ("Tied-LoRA r=8", "quickstart_tied_lora.yaml", {}),
            ("VeRA r=256", "quickstart_vera.yaml", {}),
            ("(IA)3", "quickstart_ia3.yaml", {}),
            ("Houlsby", "quickstart_houlsby.yaml", {}),
            ("Pfeiffer", "quickstart_pfeiffer.yaml", {}),
            ("prompt tuning (20 tokens)", "quickstart.yaml", {
                "peft": {"method": "prompt_tuning", "num_virtual_tokens": 20,
                         "modules_to_save": ["classifier"]}, "train.lr": 3e-2,
                "train.weight_decay": 0.0}),
            ("prefix tuning (20 tokens)", "quickstart.yaml", {
                "peft": {"method": "prefix_tuning", "num_virtual_tokens": 20,
                         "modules_to_save": ["classifier"]}, "train.lr": 1e-2,
                "train.weight_decay": 0.0}),
            ("QLoRA r=8 (NF4)", "quickstart.yaml", {"quantization.quant_type": "nf4"}),
            # the quickstart's lr 2e-3 diverges on the NF4 base (loss back at ln 2 by step ~50,
            # also with float32 compute); 5e-4 trains
            ("QLoRA r=8 (NF4), lr 5e-4", "quickstart.yaml",
             {"quantization.quant_type": "nf4", "train.lr": 5e-4}),
        ],
        "layers": [
            ("lower half (0-2)", "quickstart.yaml", {"peft.layers_to_transform": [0, 1, 2]}),
            ("upper half (3-5)", "quickstart.yaml", {"peft.layers_to_transform": [3, 4, 5]}),
            ("every other (0, 2, 4)", "quickstart.yaml", {"peft.layers_to_transform": [0, 2, 4]}),
            ("all (0-5)", "quickstart.yaml", {}),
        ],
        "modules": [
            ("attention only", "quickstart.yaml", {"peft.target_modules": _ATTENTION}),
            ("feed-forward only", "quickstart.yaml", {"peft.target_modules": _FEED_FORWARD}),
            ("both", "quickstart.yaml", {}),
        ],
        "rank": [(f"r={r}", "quickstart.yaml", {"peft.r": r, "peft.lora_alpha": 2 * r})
                 for r in (1, 2, 4, 8, 16, 32)],
        "trainables": [
            ("classifier", "quickstart.yaml", {}),
            ("classifier + pooler", "quickstart.yaml",
             {"peft.modules_to_save": ["classifier", "pooler"]}),
            ("classifier + pooler + word embeddings", "quickstart.yaml",
             {"peft.modules_to_save": ["classifier", "pooler", "word_embeddings"]}),
        ],
        "recipe": [
            ("quickstart (lr 2e-3, wd 0.01, no dropout)", "quickstart.yaml", {}),
            ("lr 1e-3", "quickstart.yaml", {"train.lr": 1e-3}),
            ("lr 5e-3", "quickstart.yaml", {"train.lr": 5e-3}),
            ("LoRA dropout 0.1 (+ model dropout)", "quickstart.yaml",
             {"peft.lora_dropout": 0.1, "train.dropout": True}),
            ("weight decay 0", "quickstart.yaml", {"train.weight_decay": 0.0}),
            ("seeds' best: + pooler, lr 1e-3, wd 0", "quickstart.yaml",
             {"peft.modules_to_save": ["classifier", "pooler"], "train.lr": 1e-3,
              "train.weight_decay": 0.0}),
        ],
    },
    "smollm2": {
        "methods": [
            ("LoRA r=8", "smollm2_sentiment_lora.yaml", {}),
            ("QLoRA r=8 (NF4)", "smollm2_sentiment_qlora.yaml", {}),
            ("QA-LoRA r=8 (INT4)", "smollm2_sentiment_qalora.yaml", {}),
            ("prompt tuning", "smollm2_sentiment_prompt.yaml", {}),
            ("prefix tuning", "smollm2_sentiment_prefix.yaml", {}),
            ("LLaMA-Adapter", "smollm2_sentiment_adaption_prompt.yaml", {}),
        ],
    },
}

# the memory study (compiles only): LoRA on the first k blocks of the quickstart model
MEMORY_REMAT = ("none", "full")

BUDGETS = {
    # seeds; overrides on top of every case's; the studies (and their labels) kept, None: all;
    # the adapted-block counts of the memory study
    "full": dict(seeds=(0, 1, 2), overrides={}, studies=None, memory_layers=(1, 2, 3, 4, 5, 6)),
    # what the tests run: 2 seeds of 20 steps at one padded length on the first 1,000 rows,
    # evaluated on 128 (~2.5 minutes here); its numbers show the machinery, not the methods.
    # The rank study keeps r=8 only: the methods study's LoRA, so it checks that a case shared
    # by two studies trains once
    "small": dict(
        seeds=(0, 1),
        overrides={"train.steps": 20, "train.warmup_steps": 2, "eval.max_examples": 128,
                   "data.max_examples": 1000, "data.buckets": [64],
                   "data.group_by_length": False},
        studies={"methods": ["classifier only", "LoRA r=8"], "rank": ["r=8"],
                 "memory": None},
        memory_layers=(1, 6)),
}


# config keys added after cases were first kept, with their defaults: at the default they are
# left out of the digest, so a new option does not orphan every finished case
ADDED_LATER = {"train.scan_layers": False}


def case_key(cfg, seed: int) -> str:
    """A case's file name: a digest of its whole resolved config, so identical cases in
    different studies (the quickstart's LoRA is in most of them) train once."""
    import hashlib
    raw = cfg.to_dict()
    raw.pop("output_dir")
    for dotted, default in ADDED_LATER.items():  # keys the first cases were digested without
        section, key = dotted.split(".")
        if raw.get(section, {}).get(key, default) == default:
            raw.get(section, {}).pop(key, None)
    digest = hashlib.sha1(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:12]
    return f"{digest}_seed{seed}"


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def case_config(task: str, config: str, overrides: dict, seed: int, budget: str, out_dir: str):
    """The RunConfig of one case: the shipped config, the task's and the case's overrides (a
    ``peft`` dict replaces the whole section), the budget's, the seed."""
    import yaml
    from peftjax.config import config_from_dict
    with open(os.path.join(CONFIGS, config)) as f:
        raw = yaml.safe_load(f)
    common = _MINILM_COMMON if task == "minilm" else _SMOLLM2_COMMON
    for dotted, value in {**common, **overrides, **BUDGETS[budget]["overrides"]}.items():
        if dotted == "peft":
            raw["peft"] = dict(value)
        else:
            _set(raw, dotted, value)
    _set(raw, "train.seed", seed)
    _set(raw, "data.shuffle_seed", seed)
    _set(raw, "output_dir", out_dir)
    return config_from_dict(raw)


def provenance() -> dict:
    """Where and when a case was trained: runs are deterministic on one host and library set,
    and the grid may be run in parts, so each case records its own."""
    import subprocess
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=REPO).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "peftjax", "configs"):
        commit += "+changes"  # the library or the configs differ from the commit
    return {"host": f"{cpu}, {os.cpu_count()} cores", "date": str(datetime.date.today()),
            "commit": commit}


def train_case(spec: dict) -> dict:
    """Child process: trains one case and returns its row (``report``-ed to the parent)."""
    from peftjax.train import dry_run, run_training
    cfg = case_config(spec["task"], spec["config"], spec["overrides"], spec["seed"],
                      spec["budget"], spec["out_dir"])
    s = run_training(cfg, progress=False, print_fn=lambda *a, **k: None)
    metric = "generation_accuracy" if spec["task"] == "smollm2" else "accuracy"
    row = {"method": cfg.peft.method, "trainable": s["trainable"], "total": s["total"],
           "trainable_pct": s["trainable_pct"], "test_accuracy": s["test"][metric],
           "test_loss": s["test"]["loss"], "test_examples": s["test"]["targets"],
           "val_accuracy": s["best"]["value"] if s.get("best") else None,
           "steps": s["steps"], "step_seconds": s["step_seconds"],
           "run_seconds": s["run_seconds"], "peak_rss_gib": s.get("host_peak_rss_gib"),
           **provenance()}
    if spec["seed"] == BUDGETS[spec["budget"]]["seeds"][0]:  # memory does not depend on it
        plan = dry_run(cfg)
        row["step_temp_gib"] = plan.get("temp_bytes", 0) / 2**30
        row["step_total_gib"] = plan.get("total_bytes", 0) / 2**30
    return row


def memory_case(spec: dict) -> dict:
    """Child process: the compiled memory of the LoRA step on the first k blocks, per remat."""
    from peftjax.train import dry_run
    rows = []
    for remat in MEMORY_REMAT:
        for k in BUDGETS[spec["budget"]]["memory_layers"]:
            cfg = case_config("minilm", "quickstart.yaml", {
                "peft.layers_to_transform": list(range(k)), "train.remat": remat}, 0,
                spec["budget"], spec["out_dir"])
            plan = dry_run(cfg)
            rows.append({"remat": remat, "adapted_blocks": k, "trainable": plan["trainable"],
                         "temp_gib": plan["temp_bytes"] / 2**30,
                         "total_gib": plan["total_bytes"] / 2**30})
    return {"rows": rows}


def _stats(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> list[dict]:
    """Rows per (study, label) with mean/std over seeds, in grid order."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["study"], r["label"]), []).append(r)
    out = []
    for (study, label), rs in groups.items():
        acc_m, acc_s = _stats([r["test_accuracy"] for r in rs])
        val_m, val_s = _stats([r["val_accuracy"] for r in rs])
        mem = next((r for r in rs if "step_temp_gib" in r), {})
        out.append({"study": study, "label": label, "method": rs[0]["method"],
                    "seeds": len(rs), "trainable": rs[0]["trainable"], "total": rs[0]["total"],
                    "trainable_pct": rs[0]["trainable_pct"], "test_acc_mean": acc_m,
                    "test_acc_std": acc_s, "val_acc_mean": val_m, "val_acc_std": val_s,
                    "test_examples": rs[0]["test_examples"], "steps": rs[0]["steps"],
                    "step_s_mean": statistics.fmean(r["step_seconds"] for r in rs),
                    "run_s_mean": statistics.fmean(r["run_seconds"] for r in rs),
                    "step_temp_gib": mem.get("step_temp_gib", math.nan),
                    "peak_rss_gib": max(r["peak_rss_gib"] or 0 for r in rs),
                    "test_accs": [r["test_accuracy"] for r in sorted(rs, key=lambda r: r["seed"])]})
    return out


def markdown(task: str, budget: str, summary: list[dict], memory: list[dict], meta: str) -> str:
    lines = [f"Methods on real data: task `{task}`, budget `{budget}`. {meta}", ""]
    for study in dict.fromkeys(r["study"] for r in summary):
        lines += [f"### {study}", "",
                  "| case | method | trainable params (% of model) | test acc. mean ± std "
                  "(seeds) | val. acc. mean | train steps s | run s | step temp GiB (XLA) | "
                  "peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in summary if r["study"] == study):
            std = lambda r: f"{r['test_acc_std']:.4f}" if r["seeds"] > 1 else "n/a"  # noqa: E731
            lines.append(
                f"| {r['label']} | {r['method']} | {r['trainable']:,d} ({r['trainable_pct']:.3f}%)"
                f" | {r['test_acc_mean']:.4f} ± {std(r)} ({r['seeds']}: "
                f"{', '.join(f'{a:.4f}' for a in r['test_accs'])}) | {r['val_acc_mean']:.4f} | "
                f"{r['step_s_mean']:.1f} | {r['run_s_mean']:.1f} | {r['step_temp_gib']:.3f} | "
                f"{r['peak_rss_gib']:.2f} |")
        lines.append("")
    if memory:
        lines += ["### memory (LoRA on the first k blocks; XLA's compiled step, no training)", "",
                  "| remat | adapted blocks | trainable params | step temporaries GiB | "
                  "step total GiB |", "|---|---|---|---|---|"]
        lines += [f"| {m['remat']} | {m['adapted_blocks']} | {m['trainable']:,d} | "
                  f"{m['temp_gib']:.4f} | {m['total_gib']:.4f} |" for m in memory]
        lines.append("")
    return "\n".join(lines)


def write_csv(path: str, summary: list[dict]) -> None:
    keys = [k for k in summary[0] if k != "test_accs"] + ["test_accs"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in summary:
            w.writerow({**r, "test_accs": " ".join(f"{a:.6f}" for a in r["test_accs"])})


def plots(prefix: str, task: str, summary: list[dict], memory: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []

    def save(fig, ax, suffix: str) -> None:
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(prefix + suffix)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    methods = [r for r in summary if r["study"] == "methods"]
    if methods:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for r in methods:
            ax.errorbar(max(r["trainable"], 1), r["test_acc_mean"], yerr=r["test_acc_std"],
                        fmt="o", capsize=3)
            ax.annotate(r["label"], (max(r["trainable"], 1), r["test_acc_mean"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"{task}: accuracy vs trainable parameters")
        save(fig, ax, "_params.png")
    rank = [r for r in summary if r["study"] == "rank"]
    if rank:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        rs = [int(r["label"].split("=")[1]) for r in rank]
        ax.errorbar(rs, [r["test_acc_mean"] for r in rank], yerr=[r["test_acc_std"] for r in rank],
                    fmt="o-", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r (alpha = 2r)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task}: accuracy vs rank")
        save(fig, ax, "_rank.png")
    if memory:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for remat in MEMORY_REMAT:
            ms = [m for m in memory if m["remat"] == remat]
            ax.plot([m["adapted_blocks"] for m in ms], [m["temp_gib"] * 1024 for m in ms], "o-",
                    label=f"remat {remat}")
        ax.set_xlabel("blocks with LoRA (from the first)")
        ax.set_ylabel("compiled step temporaries (MiB)")
        ax.set_title(f"{task}: step memory vs adapted blocks")
        ax.legend()
        save(fig, ax, "_memory.png")
    return written


def plan_cases(task: str, budget: str, studies: list[str] | None):
    """``(entries, with_memory)``: one entry per (study, label, seed) of the grid, each with
    its case spec; entries with the same resolved config share a key (one training)."""
    b = BUDGETS[budget]
    offered = list(GRID[task]) + (["memory"] if task == "minilm" else [])
    chosen = studies or offered
    unknown = [s for s in chosen if s not in offered]
    if unknown:
        sys.exit(f"--study {unknown[0]!r}: task {task!r} has studies {offered}")
    if b["studies"] is not None:
        chosen = [s for s in chosen if s in b["studies"]]
    entries = []
    for study in chosen:
        if study == "memory":
            continue
        keep = (b["studies"] or {}).get(study)
        for label, config, overrides in GRID[task][study]:
            if keep is not None and label not in keep:
                continue
            for seed in b["seeds"]:
                spec = {"task": task, "budget": budget, "config": config,
                        "overrides": overrides, "seed": seed}
                cfg = case_config(task, config, overrides, seed, budget, "unused")
                entries.append({"study": study, "label": label, "seed": seed,
                                "key": case_key(cfg, seed), "spec": spec})
    return entries, "memory" in chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(GRID), default="minilm")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--study", action="append", help="repeatable; default: all of the task's")
    p.add_argument("--fresh", action="store_true", help="retrain cases that have results")
    p.add_argument("--no-train", action="store_true", help="train nothing: the tables of the "
                   "finished cases only (a grid run in parts), naming what is missing")
    p.add_argument("--check", metavar="KEY", help="retrain one finished case (the key the "
                   "progress lines print) and compare its results with the kept ones")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--case", help=argparse.SUPPRESS)  # child process: a JSON case spec
    args = p.parse_args()
    if args.case:
        spec = json.loads(args.case)
        if spec.get("memory"):  # before JAX starts: XLA:CPU's memory-minimising scheduler, as
            # `peftjax memory` and the tests use (the default one runs remat's recomputation
            # early and hides what remat saves; GPU/TPU schedulers are memory-aware)
            flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
            if flag not in os.environ.get("XLA_FLAGS", ""):
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        report(memory_case(spec) if spec.get("memory") else train_case(spec))
        return

    name = f"methods_{args.task}_{args.budget}"
    work = os.path.join(args.results, "methods", f"{args.task}_{args.budget}")
    cases_dir = os.path.join(work, "cases")
    os.makedirs(cases_dir, exist_ok=True)
    entries, with_memory = plan_cases(args.task, args.budget, args.study)
    specs = {e["key"]: e["spec"] for e in entries}
    script = os.path.abspath(__file__)

    def run(key: str, spec: dict) -> dict:
        out_dir = os.path.join(work, "runs", key)  # scratch: the kept result is the case file
        shutil.rmtree(out_dir, ignore_errors=True)
        return run_case(script, "--case", json.dumps({**spec, "out_dir": out_dir}))

    if args.check:
        path = os.path.join(cases_dir, args.check + ".json")
        if args.check not in specs or not os.path.isfile(path):
            sys.exit(f"--check {args.check}: no finished case of that key in {cases_dir} "
                     f"for this task/budget/study selection")
        kept, again = json.load(open(path)), run(args.check, specs[args.check])
        fields = ("trainable", "test_accuracy", "test_loss", "val_accuracy")
        same = all(kept[k] == again[k] for k in fields)
        print(f"{args.check}: kept " + ", ".join(f"{k} {kept[k]!r}" for k in fields) +
              "; retrained " + ", ".join(f"{k} {again[k]!r}" for k in fields) +
              (": identical" if same else ": DIFFERENT"))
        sys.exit(0 if same else 1)

    t0 = time.perf_counter()
    results = {}
    # breadth first: every case's first seed, then the second, ...: a grid stopped part way
    # (and tabled with --no-train) has every row, with fewer seeds
    order = sorted(specs.items(), key=lambda kv: kv[1]["seed"])
    for i, (key, spec) in enumerate(order, 1):
        path = os.path.join(cases_dir, key + ".json")
        what = "; ".join(f"{e['study']}: {e['label']}" for e in entries if e["key"] == key)
        if os.path.isfile(path) and not args.fresh:
            results[key] = json.load(open(path))
            print(f"[{i}/{len(specs)}] {key} ({what}, seed {spec['seed']}): kept", flush=True)
            continue
        if args.no_train:
            print(f"[{i}/{len(specs)}] {key} ({what}, seed {spec['seed']}): missing", flush=True)
            continue
        t = time.perf_counter()
        results[key] = run(key, spec)
        with open(path + ".tmp", "w") as f:
            json.dump(results[key], f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"[{i}/{len(specs)}] {key} ({what}, seed {spec['seed']}): test acc. "
              f"{results[key]['test_accuracy']:.4f}, {time.perf_counter() - t:.0f} s", flush=True)
    memory = []
    if with_memory:
        path = os.path.join(cases_dir, "memory.json")
        if os.path.isfile(path) and not args.fresh:
            memory = json.load(open(path))["rows"]
        elif not args.no_train:
            t = time.perf_counter()
            memory = run("memory", {"task": args.task, "budget": args.budget,
                                    "memory": True})["rows"]
            with open(path + ".tmp", "w") as f:
                json.dump({"rows": memory}, f, indent=1)
            os.replace(path + ".tmp", path)
            print(f"memory study: {len(memory)} compiles, {time.perf_counter() - t:.0f} s")
    missing = [e for e in entries if e["key"] not in results]
    entries = [e for e in entries if e["key"] in results]
    if not entries and not memory:
        sys.exit("nothing to report: no case selected" + (" is finished" if missing else ""))
    rows = [{**results[e["key"]], "study": e["study"], "label": e["label"], "seed": e["seed"]}
            for e in entries]
    summary = summarise(rows) if rows else []
    took = time.perf_counter() - t0
    meta = (f"{datetime.date.today()}, {os.cpu_count()} CPU cores ({platform.machine()}); "
            f"seeds {list(BUDGETS[args.budget]['seeds'])}; {len(results)} distinct trainings "
            f"(identical configs in several studies train once), their run times summing to "
            f"{sum(r['run_seconds'] for r in results.values()):.0f} s; this invocation "
            f"{took:.0f} s (cases kept from earlier invocations are not retrained).")
    made = sorted({(r.get("host", "host not recorded"), r.get("date", "?"), r.get("commit", "?"))
                   for r in results.values()})
    meta += " Cases trained on: " + "; ".join(f"{h} ({d}, {c})" for h, d, c in made) + "."
    if missing:  # --no-train on a grid run in parts
        meta += (f" Not trained yet ({len(missing)} of {len(missing) + len(entries)} entries): "
                 + "; ".join(dict.fromkeys(f"{e['study']}: {e['label']}" for e in missing))
                 + "; a row's seed count says how many of its seeds are finished.")
    text = markdown(args.task, args.budget, summary, memory, meta)
    print(text)
    md = write_result(text, os.path.join(args.results, name + ".md"), name)
    if summary:
        write_csv(os.path.join(args.results, name + ".csv"), summary)
    if memory:
        with open(os.path.join(args.results, name + "_memory.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(memory[0]))
            w.writeheader()
            w.writerows(memory)
    for path in [md, *plots(os.path.join(args.results, name), args.task, summary, memory)]:
        print("wrote", path)


if __name__ == "__main__":
    main()
