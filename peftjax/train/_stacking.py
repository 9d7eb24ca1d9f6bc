"""Frozen weights held stacked per scanned run of blocks (``train.scan_layers``).

A scanned run of identical blocks (``peftjax.models``' ``run_blocks``) stacks its blocks'
weights into [n, ...] arrays for ``jax.lax.scan``. Stacked inside the train step, that is a
copy of every scanned frozen weight in each step, alive among the step's temporaries
(Llama-3-8B QLoRA: +3.5 GiB; README, the compile-time table). :class:`ScanLayout` moves the
stacking out of the step: the frozen weights are stacked once, the step takes them stacked and
slices them back per block, and XLA folds ``stack(W[0], ..., W[n-1])`` into ``W`` itself, so
the scan reads the argument and nothing is copied.

Example::

    set_scan_layers(model)
    graphdef, trainable, frozen = split_model(model)
    layout = ScanLayout.find(graphdef, trainable, frozen, batch, task="causal_lm")
    stacked = layout.stack(frozen, delete=True)  # the per-block arrays are freed
    step = make_train_step(graphdef, optimizer, task="causal_lm", layout=layout)
    trainable, opt_state, metrics = step(trainable, opt_state, stacked, batch, rng)
    frozen = layout.unstack(stacked)  # per block again (copies), e.g. to evaluate or save
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from peftjax.models._remat import record_scanned
from peftjax.train._step import _forward_sums


@dataclasses.dataclass(frozen=True)
class ScanLayout:
    """Which frozen leaves are held stacked: ``groups[g]`` lists the leaf indices (in
    ``jax.tree.leaves(frozen)`` order) of one weight across one scanned run, in scan order.
    The stacked form is ``{"rest": [the other leaves, in order], "stacks": [one array per
    group]}``, a pytree the steps take in place of ``frozen``."""

    treedef: jax.tree_util.PyTreeDef
    groups: tuple[tuple[int, ...], ...]

    @classmethod
    def find(cls, graphdef: nnx.GraphDef, trainable, frozen, batch: dict, *,
             task: str) -> ScanLayout:
        """Traces the model's loss once (abstractly: no computation) and records what its
        scanned runs stack. Only frozen leaves are held stacked (trainable ones are small
        and change every step); an empty layout when nothing is scanned."""
        treedef = jax.tree.structure(frozen)
        found: list[list[int]] = []

        def trace(trainable, frozen, batch):
            index = {id(a): i for i, a in enumerate(jax.tree.leaves(frozen))}
            with record_scanned() as columns:
                out = _forward_sums(graphdef, task, trainable, frozen, batch, None)
            for column in columns:
                ids = [index.get(id(a)) for a in column]
                if None not in ids:  # every block's leaf is a frozen argument
                    found.append(ids)
            return out

        jax.eval_shape(trace, trainable, frozen, batch)
        groups, taken = [], set()
        for ids in found:  # a leaf stacked twice (a stack run twice) is held once
            if len(set(ids)) == len(ids) and not taken & set(ids):
                groups.append(tuple(ids))
                taken.update(ids)
        return cls(treedef, tuple(groups))

    def describe(self) -> str:
        """One line: how many frozen weights are held stacked, over how many blocks."""
        if not self.groups:
            return "no frozen weight is held stacked (no identical blocks were scanned)"
        blocks = sorted({len(g) for g in self.groups})
        return (f"{len(self.groups)} frozen weights held stacked over "
                f"{'/'.join(map(str, blocks))} scanned blocks (stacked once, not in every step)")

    @property
    def stacked_leaves(self) -> frozenset[int]:
        return frozenset(i for g in self.groups for i in g)

    def stack(self, frozen, *, delete: bool = False) -> dict:
        """The stacked form of ``frozen`` (per-block state, as ``split_model`` gives it).
        ``delete``: free each stacked leaf's per-block array once its stack exists (they must
        not be used afterwards; the rest are kept as they are)."""
        leaves, treedef = jax.tree.flatten(frozen)
        if treedef != self.treedef:
            raise ValueError("ScanLayout.stack: these frozen weights are not the ones the layout "
                             "was found for (another model or another trainable split)")
        stacks = []
        for g in self.groups:
            parts = [leaves[i] for i in g]
            stacks.append(_stacked(parts))
            if delete:
                for a in parts:
                    if isinstance(a, jax.Array) and not a.is_deleted():
                        a.delete()
        held = self.stacked_leaves
        return {"rest": [a for i, a in enumerate(leaves) if i not in held], "stacks": stacks}

    def unstack(self, stacked: dict):
        """``frozen`` per block from :meth:`stack`'s form. Inside a jitted step this is free
        (XLA folds the slices back into the scan's stacked operand); outside, each block's
        leaves are copies."""
        leaves = [None] * self.treedef.num_leaves
        for g, s in zip(self.groups, stacked["stacks"]):
            for j, i in enumerate(g):
                leaves[i] = s[j]
        rest = iter(stacked["rest"])
        leaves = [next(rest) if a is None else a for a in leaves]
        return jax.tree.unflatten(self.treedef, leaves)


def _stacked(parts: list):
    """``jnp.stack(parts)``, sharded as its parts with a leading unsharded axis (abstract
    parts give an abstract result)."""
    first = parts[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(parts),) + first.shape, first.dtype)
    sharding = getattr(first, "sharding", None)
    if isinstance(sharding, NamedSharding):
        out = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.jit(lambda *a: jnp.stack(a), out_shardings=out)(*parts)
    return jnp.stack(parts)
