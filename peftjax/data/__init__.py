"""Datasets for training: reading rows, tokenising by format, bucketed and resumable batching.

Example::

    from peftjax.config import DataSection
    splits = load_splits(DataSection(source="vader:movie_reviews", max_length=64), tokenizer)
    stream = BatchStream(splits.train, batch_size=32, buckets=splits.buckets, seed=0,
                         pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import dataclasses

from peftjax.data._batches import (BatchStream, StreamPosition, bucket_for, collate,
                                   default_buckets, eval_batches, eval_chunks)
from peftjax.data._formats import FORMATS, label_index, pack, tokenize_rows
from peftjax.data._sources import carve_validation, load_rows
from peftjax.data._vader import prepare as prepare_vader


@dataclasses.dataclass
class Splits:
    """Tokenised examples per split, the bucket lengths, the row counts, and (classification)
    the number of classes seen in the labels."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    buckets: tuple[int, ...]
    num_labels: int | None
    rows: dict[str, int]


def load_splits(cfg, tokenizer) -> Splits:
    """Reads, splits and tokenises the data of a :class:`peftjax.config.DataSection`."""
    wanted = [s for s in (cfg.train_split, cfg.validation_split, cfg.test_split) if s]
    rows = load_rows(cfg.source, splits=wanted)
    if cfg.train_split not in rows:
        raise ValueError(f"data source {cfg.source!r} has no split {cfg.train_split!r} "
                         f"(found {sorted(rows)}); set data.train_split")
    train = rows[cfg.train_split]
    validation = rows.get(cfg.validation_split) if cfg.validation_split else None
    if validation is None and cfg.validation_fraction > 0:
        train, validation = carve_validation(train, cfg.validation_fraction, cfg.shuffle_seed)
    test = rows.get(cfg.test_split) if cfg.test_split else None
    if cfg.max_examples is not None:  # for quick trials; the first N rows of each split
        train, validation, test = (None if r is None else r[:cfg.max_examples]
                                   for r in (train, validation, test))
    counts = {"train": len(train), "validation": len(validation or []), "test": len(test or [])}
    parts = [tokenize_rows(r, cfg, tokenizer) if r else [] for r in (train, validation, test)]
    if cfg.packing:  # every split: evaluation rows are the same max_length-token windows
        parts = [pack(p, cfg.max_length) if p else [] for p in parts]
        buckets = (cfg.max_length,)
    else:
        buckets = cfg.buckets or default_buckets(cfg.max_length)
    num_labels = None
    if cfg.format == "classification":
        labels = [ex["labels"] for part in parts for ex in part]
        if min(labels) < 0:
            raise ValueError(f"negative class label {min(labels)} in the data")
        num_labels = len(cfg.label_names) if cfg.label_names else max(labels) + 1
    return Splits(*parts, buckets=buckets, num_labels=num_labels, rows=counts)


__all__ = ["BatchStream", "FORMATS", "Splits", "StreamPosition", "bucket_for", "carve_validation",
           "collate", "default_buckets", "eval_batches", "eval_chunks", "label_index", "load_rows",
           "load_splits", "pack", "prepare_vader", "tokenize_rows"]
