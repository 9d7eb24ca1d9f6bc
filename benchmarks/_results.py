"""Where the benchmarks write their tables, and how they run a case in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def write_result(text: str, out: str | None, name: str) -> str:
    """Writes ``text`` to ``out``, or to ``benchmarks/results/<name>.md``; returns the path."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name + ".md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return out


def report(result: dict) -> None:
    """Prints a case's result for :func:`run_case` (from the case's own process)."""
    print("RESULT " + json.dumps(result), flush=True)


def run_case(script: str, *args: str) -> dict:
    """Runs ``script`` with ``args`` in a fresh Python process (clean peak memory and threads)
    and returns the result it :func:`report`-ed; exits with its stderr if it failed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{os.path.basename(script)} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])
