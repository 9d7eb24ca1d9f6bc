"""The packages import each other in one direction only: models below tuners/quant, tuners and
quant below config, config below train (module-level imports; imports inside functions are
the deliberate lazy exceptions, e.g. the CLI's)."""

from __future__ import annotations

import ast
import os

from tests.conftest import REPO


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycles_between_packages():
    edges: dict[str, set[str]] = {}
    root = os.path.join(REPO, "peftjax")
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            module = os.path.relpath(path[:-3], REPO).replace(os.sep, ".").removesuffix(".__init__")
            for node in ast.parse(open(path).read()).body:
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftjax."):
                    a, b = _package(module), _package(node.module)
                    if a != b:
                        edges.setdefault(a, set()).add(b)
    cycles = sorted({tuple(sorted((a, b))) for a, bs in edges.items() for b in bs
                     if a in edges.get(b, ())})
    assert not cycles, f"package import cycles: {cycles}"
    assert "peftjax.train" not in edges.get("peftjax.config", ())
    assert "peftjax.train" not in edges.get("peftjax.data", ())
