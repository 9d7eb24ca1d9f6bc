"""Human-rated sentences from vaderSentiment's source distribution (Hutto & Gilbert, ICWSM 2014;
MIT licence), as a binary sentiment dataset that installs offline from PyPI.

``additional_resources/hutto_ICWSM_2014.tar.gz`` in the sdist holds four corpora, each a
tab-separated ``id, mean rating, text`` file (latin-1) whose ratings are the mean of about 20
human judgements on a -4 (most negative) .. +4 (most positive) scale. Labels: ``positive`` (1)
when the mean rating is > 0, ``negative`` (0) when it is < 0; sentences rated exactly 0 are
dropped (37 of the 10,605 movie-review snippets). The rows are split 80/10/10 into train,
validation and test by a permutation with a fixed seed, so every machine gets the same split.
"""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np

CORPORA = {
    "movie_reviews": "movieReviewSnippets_GroundTruth.txt",
    "amazon_reviews": "amazonReviewSnippets_GroundTruth.txt",
    "nyt_editorials": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
LABEL_NAMES = ("negative", "positive")
SPLIT_FRACTIONS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
SPLIT_SEED = 20140530


def cache_root() -> str:
    return os.environ.get("PEFTJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "peftjax"))


def _sdist(folder: str) -> str:
    """The vaderSentiment sdist in ``folder``, fetched with ``pip download`` when absent."""
    found = sorted(glob.glob(os.path.join(folder, "vaderSentiment-*.tar.gz"))
                   + glob.glob(os.path.join(folder, "vadersentiment-*.tar.gz")))
    if found:
        return found[-1]
    os.makedirs(folder, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "vaderSentiment==3.3.2", "-d", folder]
    run = subprocess.run(cmd, capture_output=True, text=True)
    found = glob.glob(os.path.join(folder, "*ader*entiment-*.tar.gz"))
    if run.returncode != 0 or not found:
        raise RuntimeError(
            "could not download vaderSentiment's source distribution from PyPI "
            f"({' '.join(cmd)}: {run.stderr.strip().splitlines()[-1:] or run.returncode}). Download "
            f"it yourself (pip download --no-deps --no-binary :all: vadersentiment) into {folder}.")
    return found[0]


def _read_corpus(sdist: str, filename: str) -> list[tuple[str, float, str]]:
    with tarfile.open(sdist) as outer:
        inner_name = next((m.name for m in outer.getmembers()
                           if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")), None)
        if inner_name is None:
            raise RuntimeError(f"{sdist}: no additional_resources/hutto_ICWSM_2014.tar.gz inside")
        inner_bytes = outer.extractfile(inner_name).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next(m for m in inner.getmembers() if m.name.endswith("/" + filename))
        text = inner.extractfile(member).read().decode("latin-1")
    rows = []
    for line in text.splitlines():
        parts = line.strip("\r\n").split("\t")
        if len(parts) >= 3 and parts[0].strip():
            rows.append((parts[0].strip(), float(parts[1]), "\t".join(parts[2:]).strip()))
    return rows


def prepare(corpus: str = "movie_reviews", *, cache_dir: str | None = None) -> dict[str, str]:
    """Writes ``{train,validation,test}.jsonl`` (fields ``id, rating, text, label, label_text``)
    for a VADER corpus once and returns ``{split: path}``."""
    if corpus not in CORPORA:
        raise ValueError(f"vader:{corpus}: unknown corpus; choose one of "
                         f"{', '.join('vader:' + c for c in CORPORA)}")
    root = cache_dir or os.path.join(cache_root(), "vader")
    out = os.path.join(root, corpus)
    paths = {name: os.path.join(out, f"{name}.jsonl") for name, _ in SPLIT_FRACTIONS}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    from peftjax._files import cache_lock
    with cache_lock(os.path.join(root, ".lock")):  # one process prepares, the others wait
        if not all(os.path.isfile(p) for p in paths.values()):
            _write_splits(root, corpus, paths)
    return paths


def _write_splits(root: str, corpus: str, paths: dict[str, str]) -> None:
    out = os.path.dirname(next(iter(paths.values())))
    rows = [r for r in _read_corpus(_sdist(root), CORPORA[corpus]) if r[1] != 0.0]
    order = np.random.RandomState(SPLIT_SEED).permutation(len(rows))
    os.makedirs(out, exist_ok=True)
    start = 0
    for i, (name, frac) in enumerate(SPLIT_FRACTIONS):
        stop = len(rows) if i == len(SPLIT_FRACTIONS) - 1 else start + round(frac * len(rows))
        tmp = paths[name] + ".tmp"
        with open(tmp, "w") as f:
            for j in order[start:stop]:
                rid, rating, text = rows[j]
                label = int(rating > 0)
                f.write(json.dumps({"id": rid, "rating": rating, "text": text, "label": label,
                                    "label_text": LABEL_NAMES[label]}) + "\n")
        os.replace(tmp, paths[name])
        start = stop
