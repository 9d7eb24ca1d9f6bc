"""Examples -> fixed-shape padded batches.

Batches are padded to the smallest of a few bucket lengths that holds their longest example,
so a run compiles at most ``len(buckets)`` train steps. The training order is a seeded
permutation per epoch, and the stream's position (epoch, batch index) is saved in checkpoints
and restored on resume.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from peftjax.data._formats import IGNORE_INDEX


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``max_length``, plus ``max_length`` itself."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"an example of {length} tokens exceeds the largest bucket {buckets[-1]}")


def collate(examples: list[dict], *, length: int, batch_size: int, pad_id: int) -> dict:
    """Right-padded numpy batch of ``batch_size`` rows (missing rows are all padding and have
    ignored labels, so a short final eval batch keeps the compiled shape)."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    lm = np.ndim(examples[0]["labels"]) == 1  # per-token labels; else one class per row
    labels = (np.full((batch_size, length), IGNORE_INDEX, np.int32) if lm
              else np.full((batch_size,), IGNORE_INDEX, np.int32))
    types = np.zeros((batch_size, length), np.int32) if "token_type_ids" in examples[0] else None
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = ex["input_ids"]
        mask[i, :n] = 1
        if lm:
            labels[i, :n] = ex["labels"]
        else:
            labels[i] = ex["labels"]
        if types is not None:
            types[i, :n] = ex["token_type_ids"]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if types is not None:
        batch["token_type_ids"] = types
    if "task_ids" in examples[0]:  # padding rows take task 0 (their labels are ignored)
        batch["task_ids"] = np.zeros((batch_size,), np.int32)
        batch["task_ids"][:len(examples)] = [ex["task_ids"] for ex in examples]
    return batch


@dataclasses.dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0  # batches already taken in this epoch


# batches per length-sorted group of BatchStream(group_by_length=True) (the Hugging Face
# Trainer's megabatch size for group_by_length)
GROUP_BATCHES = 50


class BatchStream:
    """Endless shuffled training batches. ``position`` / ``restore(position)`` make it resumable:
    the batch after a restore is the one that would have come next.

    ``group_by_length``: batches of similar lengths (less padding, so less compute per
    example), as the Hugging Face Trainer's option of that name: each epoch's permutation is cut
    into groups of :data:`GROUP_BATCHES` batches, each group is sorted by length, cut into
    batches, and the epoch's batches are shuffled. An epoch still takes every example once
    (but for the fewer than ``batch_size`` left over, as without grouping).

    Example::

        stream = BatchStream(examples, batch_size=32, buckets=(32, 64), seed=0, pad_id=0)
        batch = next(stream)          # numpy dict: input_ids, attention_mask, labels
        saved = stream.position       # StreamPosition(epoch=0, index=1)

    ``rows``: collate only these rows of each batch (one process's share in a multi-process
    run, ``peftjax.train.process_rows``); which examples form a batch and its padded length
    are those of the whole batch, so the shares of all processes together are the batch one
    process would make. ``last_tokens``: the real tokens of the whole batch last taken.
    """

    def __init__(self, examples: list[dict], *, batch_size: int, buckets: tuple[int, ...],
                 seed: int, pad_id: int, group_by_length: bool = False,
                 rows: slice | None = None):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples are fewer than one batch "
                             f"(batch_size={batch_size}); lower train.batch_size or add data")
        self.examples, self.batch_size, self.buckets = examples, batch_size, tuple(buckets)
        self.seed, self.pad_id, self.group_by_length = seed, pad_id, group_by_length
        self.batches_per_epoch = len(examples) // batch_size  # the remainder is dropped per epoch
        self.rows = slice(0, batch_size) if rows is None else rows
        if not 0 <= self.rows.start < self.rows.stop <= batch_size:
            raise ValueError(f"rows {self.rows} are not within a batch of {batch_size}")
        self.position = StreamPosition()
        self.last_tokens = 0
        self._order_epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            if self.group_by_length:
                order = self._grouped(order, np.random.default_rng([self.seed, epoch, 1]))
            self._order, self._order_epoch = order, epoch
        return self._order

    def _grouped(self, order: np.ndarray, rng) -> np.ndarray:
        lengths = np.asarray([len(ex["input_ids"]) for ex in self.examples])
        size = GROUP_BATCHES * self.batch_size
        groups = [g[np.argsort(-lengths[g], kind="stable")]
                  for g in np.split(order, range(size, len(order), size))]
        n = self.batches_per_epoch * self.batch_size
        batches = np.concatenate(groups)[:n].reshape(self.batches_per_epoch, self.batch_size)
        return batches[rng.permutation(self.batches_per_epoch)].reshape(-1)

    def restore(self, position: StreamPosition | dict) -> None:
        if isinstance(position, dict):
            position = StreamPosition(**position)
        if not 0 <= position.index <= self.batches_per_epoch:
            raise ValueError(f"data position {position} does not fit this dataset "
                             f"({self.batches_per_epoch} batches per epoch): the data changed "
                             "since the checkpoint was written")
        self.position = dataclasses.replace(position)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        pos = self.position
        if pos.index >= self.batches_per_epoch:
            pos.epoch, pos.index = pos.epoch + 1, 0
        order = self._order_of(pos.epoch)
        take = order[pos.index * self.batch_size:(pos.index + 1) * self.batch_size]
        pos.index += 1
        lengths = [len(self.examples[i]["input_ids"]) for i in take]
        self.last_tokens = int(sum(lengths))
        length = bucket_for(max(lengths), self.buckets)
        chosen = [self.examples[i] for i in take[self.rows]]
        return collate(chosen, length=length, batch_size=len(chosen), pad_id=self.pad_id)


def eval_chunks(examples: list[dict], *, batch_size: int, buckets: tuple[int, ...], pad_id: int):
    """``(examples, batch)`` pairs for evaluation: examples sorted by length (less padding),
    every example exactly once; the last batch is filled with ignored rows."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chosen = [examples[i] for i in order[start:start + batch_size]]
        length = bucket_for(max(len(ex["input_ids"]) for ex in chosen), buckets)
        yield chosen, collate(chosen, length=length, batch_size=batch_size, pad_id=pad_id)


def eval_batches(examples: list[dict], *, batch_size: int, buckets: tuple[int, ...], pad_id: int):
    """The batches of :func:`eval_chunks`."""
    for _, batch in eval_chunks(examples, batch_size=batch_size, buckets=buckets, pad_id=pad_id):
        yield batch
