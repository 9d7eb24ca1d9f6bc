"""The benchmark scripts stay runnable (tiny shapes; the numbers themselves are not asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_train_step_benchmark_runs(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"),
                           "--size", "tiny", "--steps", "1", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| peftjax") or
            ln.startswith("| torch")]
    assert [r.split("|")[1].strip() for r in rows] == ["peftjax_full", "peftjax_lora",
                                                        "torch_peft_lora"]
    for r in rows:  # tokens/s column is a positive number
        assert float(r.split("|")[5].strip().replace(",", "")) > 0
