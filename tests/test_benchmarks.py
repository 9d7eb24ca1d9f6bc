"""The benchmark scripts stay runnable (tiny shapes; the numbers themselves are not asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_benchmark(script: str, out, *args: str) -> None:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args,
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]


def test_train_step_benchmark_runs(tmp_path):
    out = tmp_path / "table.md"
    run_benchmark("train_step.py", out, "--size", "tiny", "--steps", "1", "--warmup", "1")
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| peftjax") or
            ln.startswith("| torch")]
    assert [r.split("|")[1].strip() for r in rows] == ["peftjax_full", "peftjax_lora",
                                                        "torch_full", "torch_peft_lora"]
    for r in rows:  # tokens/s is a positive number; torch against itself is 1.00x
        cells = [c.strip() for c in r.split("|")]
        assert float(cells[5].replace(",", "")) > 0
        assert cells[7] == "1.00x" if cells[1].startswith("torch") else cells[7].endswith("x")
    full = next(r for r in rows if r.startswith("| torch_full")).split("|")[3]
    assert full.split("/")[0].strip() == full.split("/")[1].strip()  # every weight trains


def test_train_step_flops_are_six_n_for_full_and_four_n_for_lora(monkeypatch):
    """MFU's FLOP count: TinyLlama-1.1B's 1.03B matrix parameters (its 1.10B less the 65.5M of
    input embeddings and 92k of norm weights) give 6 N FLOPs per token for full fine-tuning,
    4 N for LoRA, plus attention."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import train_step

    s = train_step.SIZES["1b"]
    tokens = s["batch"] * s["seq"]
    n = 1_100_048_384 - s["vocab"] * s["hidden"] - (2 * s["layers"] + 1) * s["hidden"]
    attention = 12 * s["layers"] * s["seq"] * s["hidden"]  # 3 x the forward's 4 L T d
    assert train_step.step_flops("peftjax_full", s) / tokens == 6 * n + attention
    assert train_step.step_flops("peftjax_lora", s) / tokens == 4 * n + 2 * attention // 3
    assert train_step.mfu("peftjax_lora", s, dict(device="cpu: cpu", step_s=1.0)) == "-"
    r = dict(device="NVIDIA H100 80GB HBM3",
             step_s=train_step.step_flops("peftjax_lora", s) / 989e12)
    assert train_step.mfu("peftjax_lora", s, r) == "100.0%"


def test_xla_cpu_flags_benchmark_runs(tmp_path):
    """Each setting in a process of its own; a flag the jaxlib does not know is a row that says
    so, and the other settings still run."""
    out = tmp_path / "flags.md"
    run_benchmark("xla_cpu_flags.py", out, "--size", "tiny", "--steps", "1", "--warmup", "1",
                  "--settings", "default", "--try=--xla_cpu_no_such_flag=1", "--no-torch",
                  "--repeats", "1")
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.read_text().splitlines()
            if ln.startswith("| default") or ln.startswith("| --try")]
    assert [r[0] for r in rows] == ["default", "--try 1"], rows
    assert rows[0][3] == "1.00x" and float(rows[0][2].split(" ")[0]) > 0, rows
    assert rows[0][6] == "+0.00e+00", rows
    assert rows[1][2].startswith("rejected"), rows


def test_nf4_matmul_benchmark_runs(tmp_path):
    out = tmp_path / "nf4.md"
    run_benchmark("nf4_matmul.py", out, "--size", "tiny", "--iters", "3", "--repeats", "2")
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.read_text().splitlines()
            if ln.startswith("| 256x128 |")]
    rows = [r for r in rows if len(r) == 10]  # the main table (not the summary below it)
    assert [(r[1], r[2]) for r in rows] == [(m, meth) for m in ("1", "16") for meth in
                                             ("xla_dense", "xla_dequant", "pallas", "bnb")]
    for r in rows:
        if r[2] in ("xla_dense", "xla_dequant"):  # timed, and the same function as the reference
            assert float(r[3]) > 0 and float(r[4]) > 0 and float(r[8]) < 1e-5, r
        elif r[2] == "pallas":  # not timed on CPU, and the table says why
            assert r[3] == "-" and r[9].startswith("skipped: runs on GPU/TPU only"), r
        else:  # bitsandbytes on CPU (the test extra installs it); double quant adds ~2e-3
            assert float(r[3]) > 0 and float(r[8]) < 1e-2, r


def test_longlora_benchmark_runs(tmp_path):
    out = tmp_path / "longlora.md"
    run_benchmark("longlora.py", out, "--size", "tiny", "--steps", "1")
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.read_text().splitlines()
            if ln.startswith("| full") or ln.startswith("| S2")]
    assert [r[0] for r in rows] == ["full attention", "S2-Attn, groups of 1/4",
                                    "S2-Attn, groups of 1/8"]
    assert all(float(r[4].replace(",", "")) > 0 for r in rows)  # tokens/s


def test_longlora_extension_benchmark_runs(tmp_path):
    """The extension study end to end at the tiny budget: pretraining, both extension runs,
    the table; both extension runs start from the same model (the interpolated pretrained
    model with LoRA's zero B), so their before-training perplexities agree."""
    import json
    out = tmp_path / "extension.md"
    run_benchmark("longlora_extension.py", out, "--budget", "tiny", "--quiet")
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.read_text().splitlines()
            if ln.startswith("| ") and not ln.startswith("| model")]
    assert [r[0].split(",")[0] for r in rows] == [
        "pretrained", "pretrained", "pretrained", "LongLoRA (S2-Attn 1/4)", "LoRA"]
    assert all(float(r[1]) > 1 for r in rows) and float(rows[3][2]) > 0
    runs = json.loads((tmp_path / "extension.json").read_text())
    assert runs["longlora"]["test_before"]["perplexity"] == pytest.approx(
        runs["lora"]["test_before"]["perplexity"], rel=1e-6)
    assert runs["longlora"]["steps"] == runs["lora"]["steps"] == 2


def test_serving_benchmark_runs(tmp_path):
    out = tmp_path / "serving.md"
    run_benchmark("serving.py", out, "--size", "tiny", "--adapters", "2", "--requests", "4",
                  "--tokens", "3", "--batch", "2", "--swap-slots", "1", "--registered", "3",
                  "--repeats", "1")
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.read_text().splitlines()
            if ln.startswith("| ") and not ln.startswith("| system")]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("merged model", "1", "-"), ("peftjax mixed", "2", "2"),
        ("peftjax one at a time", "2", "2"), ("peftjax swapping", "2", "1"),
        ("torch PEFT mixed", "2", "-"), ("peftjax swapping (3 registered)", "3", "1")]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)  # tokens/s
    assert int(rows[3][9]) >= 2  # the swapping run loaded adapters into its one slot
    assert (tmp_path / "serving.png").stat().st_size > 1000


def test_memory_plan_benchmark_runs(tmp_path):
    out = tmp_path / "plan.md"
    run_benchmark("memory_plan.py", out, "--size", "tiny", "--plans", "qlora", "--seqs", "64")
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.read_text().splitlines()
            if ln.startswith("| qlora")]
    assert len(rows) == 1 and rows[0][1] == "64"
    assert float(rows[0][2]) > 0 and float(rows[0][-1]) > float(rows[0][-2]) > 0  # MiB


def test_compile_time_benchmark_runs(tmp_path):
    """Both modes of each plan compile in a process of their own; the table has one row per
    plan with positive compile times."""
    out = tmp_path / "compile.md"
    run_benchmark("compile_time.py", out, "--sizes", "tiny", "--plans", "lora", "--seq", "64")
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.read_text().splitlines()
            if ln.startswith("| tiny")]
    assert [r[:3] for r in rows] == [["tiny", "lora", "4"]], rows
    assert float(rows[0][3]) > 0 and float(rows[0][4]) > 0 and rows[0][5].endswith("x"), rows


def test_generate_benchmark_runs(tmp_path):
    out = tmp_path / "generate.md"
    run_benchmark("generate.py", out, "--size", "tiny", "--batches", "1,2", "--length", "8",
                  "--tokens", "4", "--repeats", "1")
    text = out.read_text()
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines()
            if ln.startswith("| peftjax") or ln.startswith("| transformers")]
    assert [(r[0], r[1]) for r in rows] == [("peftjax", "1"), ("peftjax", "2"),
                                            ("transformers", "1"), ("transformers", "2")]
    assert all(float(r[3].replace(",", "")) > 0 for r in rows)  # tokens/s
    assert "Same tokens: yes" in text  # greedy on the same weights gives the same tokens


def _table(text: str, study: str) -> list[list[str]]:
    """The rows of one study's table in methods.py's markdown."""
    block = text.split(f"### {study}", 1)[1].split("\n### ", 1)[0]
    return [[c.strip() for c in ln.split("|")[1:-1]] for ln in block.splitlines()
            if ln.startswith("| ") and not ln.startswith("| case") and
            not ln.startswith("| remat")]


def test_methods_benchmark_small_budget(tmp_path):
    """``--budget small`` trains its reduced grid for real (MiniLM on the movie reviews, 2 seeds,
    20 steps), writes the tables and plots, ``--check`` retrains a case identically, and
    ``--no-train`` tables a grid that is only partly finished."""
    script = os.path.join(REPO, "benchmarks", "methods.py")
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, script, "--budget", "small", "--results",
                           str(results)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "4 distinct trainings" in proc.stdout, proc.stdout[-3000:]
    text = (results / "methods_minilm_small.md").read_text()
    methods = _table(text, "methods")
    assert [r[0] for r in methods] == ["classifier only", "LoRA r=8"]
    # the parameter counts of the shipped configs (README: quickstart results)
    assert [r[2].split(" ")[0] for r in methods] == ["770", "338,690"]
    rank = _table(text, "rank")
    assert [r[0] for r in rank] == ["r=8"] and rank[0][2:5] == methods[1][2:5]  # trained once
    for r in methods + rank:  # mean ± std (2 seeds: a, b), every accuracy a probability
        accs = [float(a) for a in r[3].split(": ")[1].rstrip(")").split(", ")]
        assert len(accs) == 2 and all(0.0 < a <= 1.0 for a in accs), r
        assert abs(float(r[3].split(" ")[0]) - sum(accs) / 2) < 1e-4, r
    memory = _table(text, "memory")
    none = [float(r[3]) for r in memory if r[0] == "none"]
    full = [float(r[3]) for r in memory if r[0] == "full"]
    assert [r[1] for r in memory] == ["1", "6"] * 2
    assert none[0] < none[1] and full[1] < none[1], memory
    for name in ("methods_minilm_small.csv", "methods_minilm_small_memory.csv",
                 "methods_minilm_small_params.png", "methods_minilm_small_rank.png",
                 "methods_minilm_small_memory.png"):
        assert (results / name).stat().st_size > 100, name
    # rerunning reuses every finished case; --check retrains one and finds the same numbers
    key = next(ln.split(" ")[1] for ln in proc.stdout.splitlines()
               if "methods: classifier only" in ln and "seed 0" in ln)
    again = subprocess.run([sys.executable, script, "--budget", "small", "--results",
                            str(results), "--check", key], capture_output=True, text=True,
                           timeout=600, cwd=REPO)
    assert again.returncode == 0 and "identical" in again.stdout, again.stdout + again.stderr
    # a grid run in parts: --no-train tables what is finished and names what is not
    lora1 = next(ln.split(" ")[1] for ln in proc.stdout.splitlines()
                 if "methods: LoRA r=8" in ln and "seed 1" in ln)
    os.remove(results / "methods" / "minilm_small" / "cases" / f"{lora1}.json")
    part = subprocess.run([sys.executable, script, "--budget", "small", "--results",
                           str(results), "--no-train"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert part.returncode == 0, part.stdout + part.stderr
    text = (results / "methods_minilm_small.md").read_text()
    assert "Not trained yet (2 of 6 entries): methods: LoRA r=8; rank: r=8" in text, text
    assert _table(text, "methods")[0] == methods[0]  # the finished row is unchanged
    seed0 = methods[1][3].split("(2: ")[1].split(",")[0]  # LoRA's seed-0 accuracy
    assert _table(text, "methods")[1][3] == f"{seed0} ± n/a (1: {seed0})", text
