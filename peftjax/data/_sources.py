"""Reading rows: local files (json/jsonl/csv/parquet/txt), a directory of split files, a Hub
dataset name (through Hugging Face ``datasets``), or a built-in ``vader:CORPUS``."""

from __future__ import annotations

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
                ds = datasets.load_dataset(_builder(files[split]), data_files=files[split],
                                           split="train")
                out[split] = ds.to_list()
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


def carve_validation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Splits ``fraction`` of ``rows`` off as validation by a seeded permutation."""
    order = np.random.RandomState(seed).permutation(len(rows))
    n_val = max(1, round(fraction * len(rows)))
    val = set(order[:n_val].tolist())
    return ([r for i, r in enumerate(rows) if i not in val], [rows[i] for i in sorted(val)])
