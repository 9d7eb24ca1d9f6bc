"""Reading rows: local files (json/jsonl/csv/parquet/txt), a directory of split files, a Hub
dataset name (through Hugging Face ``datasets``), or a built-in ``vader:CORPUS``."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from peftjax.data import _vader

EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
              ".txt": "text"}


def _builder(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"{path}: unsupported data file type {ext!r}; use one of "
                         f"{', '.join(EXTENSIONS)}")
    return EXTENSIONS[ext]


def _split_files(source: str) -> dict[str, str]:
    if source.startswith("vader:"):
        return _vader.prepare(source[len("vader:"):])
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return {"train": path}
    if os.path.isdir(path):
        files = {}
        for name in sorted(os.listdir(path)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in EXTENSIONS and not name.startswith("."):
                if stem in files:
                    raise ValueError(f"{path}: two files for split {stem!r}")
                files[stem] = os.path.join(path, name)
        if not files:
            raise ValueError(f"{path}: no data files ({', '.join(EXTENSIONS)}) in the directory; "
                             "name them by split, e.g. train.jsonl, validation.jsonl, test.jsonl")
        return files
    if path.startswith((".", "/", "~")) or os.path.splitext(path)[1].lower() in EXTENSIONS:
        raise FileNotFoundError(f"data source {source!r}: no such file or directory")
    return {}  # a Hub dataset name


def load_rows(source: str, *, splits: list[str]) -> dict[str, list[dict]]:
    """``{split: rows}`` for the requested splits that exist (rows are plain dicts)."""
    import datasets

    files = _split_files(source)
    out = {}
    if files:
        for split in splits:
            if split in files:
                out[split] = _read_file(files[split])
        if not out:
            raise ValueError(f"data source {source!r} has splits {sorted(files)}; the config asks "
                             f"for {splits}. Set data.train_split / validation_split / test_split.")
        return out
    try:
        available = datasets.get_dataset_split_names(source)
    except Exception as e:  # offline, unknown name
        raise ValueError(f"data source {source!r} is not a file, a directory or vader:CORPUS, and "
                         f"the Hub dataset could not be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}).") from e
    for split in splits:
        if split in available:
            out[split] = datasets.load_dataset(source, split=split).to_list()
    return out


def _read_file(path: str) -> list[dict]:
    """The rows of one local data file; a file that is empty or does not parse fails with one
    line naming the file (and, for JSON, the line and what is wrong there)."""
    import datasets

    kind = _builder(path)
    with open(path, "rb") as f:
        if not f.read(1 << 16).strip():
            raise ValueError(f"{path}: the file is empty; a data file needs at least one row")
    quiet = logging.getLogger("datasets")  # its loaders log the raw parser error first
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        rows = datasets.load_dataset(kind, data_files=path, split="train").to_list()
    except Exception as e:  # datasets wraps the parser's error in its own generation errors
        where = _first_bad_json(path) if kind == "json" else None
        if where is None:
            root = e
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            lines = str(root).strip().splitlines()
            where = f"{type(root).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
        raise ValueError(f"{path}: could not be read as {kind}: {where}") from e
    finally:
        quiet.setLevel(level)
    if not rows:
        raise ValueError(f"{path}: no rows; a data file needs at least one row")
    return rows


def _first_bad_json(path: str) -> str | None:
    """Where a JSON or JSON-lines file stops parsing (``line N: message``), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start}: {e.reason})"
    if text.lstrip().startswith("["):  # one JSON document holding a list of rows
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        return None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}: {e.msg} (column {e.colno}) in {line.strip()[:80]!r}"
            if not isinstance(row, dict):
                return f"line {n}: expected a JSON object per line, got {type(row).__name__}"
    return None


def carve_validation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Splits ``fraction`` of ``rows`` off as validation by a seeded permutation."""
    order = np.random.RandomState(seed).permutation(len(rows))
    n_val = max(1, round(fraction * len(rows)))
    val = set(order[:n_val].tolist())
    return ([r for i, r in enumerate(rows) if i not in val], [rows[i] for i in sorted(val)])
