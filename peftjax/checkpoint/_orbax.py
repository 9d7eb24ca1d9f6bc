"""Training checkpoints with orbax: trainable params, optimizer state, rng, step, data position.

The state pytree is flattened to numbered leaves (``leaf_00000`` ...) and its key paths are kept
in the JSON metadata, so a restore checks that the checkpoint belongs to the same model and
adapter configuration and fails with the first differing path otherwise. Orbax writes each step
into a temporary directory and renames it when complete, so a process killed mid-save leaves no
step directory that looks valid; the previous steps stay untouched.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model/optimizer it is restored into."""


def _flatten(tree) -> tuple[dict, list[str], object]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = {f"leaf_{i:05d}": leaf for i, (_, leaf) in enumerate(with_path)}
    paths = [jax.tree_util.keystr(p) for p, _ in with_path]
    return leaves, paths, treedef


class RunCheckpointer:
    """Saves and restores the training state of a run under ``directory`` (one subdirectory per
    step; the newest ``keep`` are kept).

    Example::

        ckpt = RunCheckpointer("runs/x/checkpoints", keep=2)
        ckpt.save(100, {"trainable": tr, "opt_state": st, "rng": key_data}, meta={"data": pos})
        state, meta = ckpt.restore(ckpt.latest_step(), like={"trainable": tr, ...})
    """

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, *, meta: dict) -> None:
        """Starts writing ``state`` (any pytree of arrays) and ``meta`` (JSON) for ``step``;
        returns once the arrays are copied off the device (the write finishes in the background
        when async). Call :meth:`wait` before reading it back or exiting."""
        leaves, paths, _ = _flatten(state)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves),
            meta=ocp.args.JsonSave({**meta, "step": step, "paths": paths})), force=True)

    def restore(self, step: int, *, like) -> tuple[object, dict]:
        """Restores ``step`` into the structure, dtypes and shardings of ``like`` (a pytree of
        arrays or ``jax.ShapeDtypeStruct``)."""
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        leaves, paths, treedef = _flatten(like)
        if meta.get("paths") != paths:
            saved = meta.get("paths") or []
            diff = next((f"{a!r} (checkpoint) vs {b!r} (now)" for a, b in zip(saved, paths) if a != b),
                        f"{len(saved)} leaves (checkpoint) vs {len(paths)} (now)")
            raise CheckpointMismatchError(
                f"{self.directory}/{step}: the checkpoint was written for a different model, "
                f"adapter or optimizer configuration: {diff}. Use the config it was trained with, "
                "or a new output_dir.")
        # a leaf without a placement goes to the first device (not the placement it was saved
        # with, which may be another process count's)
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                            sharding=getattr(v, "sharding", None) or here)
                    for k, v in leaves.items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        for key, want in abstract.items():
            got = restored[key]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointMismatchError(f"{self.directory}/{step}: leaf {paths[int(key[5:])]} "
                                              f"is {got.dtype}{list(got.shape)} in the checkpoint, "
                                              f"{want.dtype}{list(want.shape)} now")
        return jax.tree_util.tree_unflatten(treedef, [restored[k] for k in leaves]), meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
