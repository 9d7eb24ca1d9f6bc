"""Where the benchmarks write their tables."""

from __future__ import annotations

import os


def write_result(text: str, out: str | None, name: str) -> str:
    """Writes ``text`` to ``out``, or to ``benchmarks/results/<name>.md``; returns the path."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name + ".md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return out
