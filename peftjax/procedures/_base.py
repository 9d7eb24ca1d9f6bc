"""Training procedures: what a run does at step boundaries beyond the train step itself
(ReLoRA's restarts; surgical fine-tuning's choice of blocks).

A procedure is one file under ``peftjax/procedures/`` defining a frozen config dataclass that
derives from :class:`ProcedureConfig` and is registered with :func:`register_procedure`; the
YAML ``procedure`` section names it (``procedure: {method: relora, reset_every: 200}``) and its
other keys are the dataclass's fields. The run loop, the checkpoints and the export commands
only talk to these hooks (defaults: do nothing):

- ``problems(run_cfg)``: what in the run config the procedure cannot work with (checked when
  the config is validated, before anything loads).
- ``prepare(run_cfg, *, load_model, batches, print_fn, fresh)``: the run config to train with,
  decided before the model is built (surgical fine-tuning ranks the blocks here); ``fresh``:
  the run starts at step 0 (decide anew), otherwise (resume, eval, export) reuse what the run
  recorded.
- ``schedule(schedule)``: the learning-rate schedule to train with, given the run's.
- ``learning_rate_scales(trainable)``: a pytree like ``trainable`` of per-leaf learning-rate
  factors, or None.
- ``training_context()``: a context manager entered while the train step is traced.
- ``attach(graphdef, trainable, frozen, key=)``: a :class:`ProcedureRun` for this model; it acts at
  step boundaries and names the frozen weights a checkpoint must hold because they no longer
  equal the base checkpoint's.
- ``final_model(model)``: the model the run and ``peftjax export`` save (ReLoRA: merged).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar

import jax
from flax import nnx


class ProcedureRun:
    """A procedure attached to one model (see the module doc); the defaults do nothing.
    ``changes_frozen``: :meth:`boundary` writes frozen weights, so :meth:`saved_state` reads
    them (the run loop hands the frozen weights per block only to such a procedure when it
    holds them stacked for scanned blocks)."""

    changes_frozen: ClassVar[bool] = False

    def at_boundary(self, step: int) -> bool:
        """Whether :meth:`boundary` runs after train step ``step`` (1-based count)."""
        return False

    def boundary(self, step: int, trainable, frozen, opt_state) -> tuple[Any, Any, Any, dict]:
        """``(trainable, frozen, opt_state, record)`` after the procedure's action at ``step``;
        ``record`` is logged to ``metrics.jsonl``."""
        return trainable, frozen, opt_state, {}

    def saved_state(self, frozen) -> dict[str, jax.Array]:
        """Frozen leaves that differ from the base checkpoint (saved with every checkpoint),
        keyed by their state path."""
        return {}

    def restored(self, frozen, saved: dict[str, jax.Array]):
        """``frozen`` with the leaves of :meth:`saved_state` put back."""
        return frozen


@dataclasses.dataclass(frozen=True)
class ProcedureConfig:
    """Base of every procedure's config (see the module doc for the hooks)."""

    method: ClassVar[str | None] = None  # None: no procedure (the base class itself)

    def problems(self, run_cfg) -> list[str]:
        return []

    def prepare(self, run_cfg, *, load_model, batches, print_fn, fresh: bool = False):
        return run_cfg

    def schedule(self, schedule):
        return schedule

    def learning_rate_scales(self, trainable):
        return None

    def training_context(self):
        """A context manager entered while the train step is traced (not the eval step):
        model behaviour for training only (LongLoRA's shifted sparse attention)."""
        return contextlib.nullcontext()

    def final_model(self, model: nnx.Module) -> nnx.Module:
        """The model a run (and ``peftjax export``) saves: a ``PeftModel`` saves its adapter,
        a plain model its weights."""
        return model

    def attach(self, graphdef: nnx.GraphDef, trainable, frozen, *, key: jax.Array
               ) -> ProcedureRun:
        """``key``: the procedure's own random key (from ``train.seed``)."""
        return ProcedureRun()


_PROCEDURES: dict[str, type[ProcedureConfig]] = {}


def register_procedure(cls: type[ProcedureConfig]) -> type[ProcedureConfig]:
    """Class decorator (above ``@dataclasses.dataclass``): makes a procedure known to YAML."""
    if _PROCEDURES.get(cls.method, cls) is not cls:
        raise ValueError(f"procedure {cls.method!r} is registered twice")
    _PROCEDURES[cls.method] = cls
    return cls


def registered_procedures() -> dict[str, type[ProcedureConfig]]:
    return dict(_PROCEDURES)


def path_key(path: tuple) -> str:
    """A state path as one string (checkpoint keys)."""
    return ".".join(map(str, path))


def replace_leaves(state: nnx.State, values: dict[str, jax.Array]) -> nnx.State:
    """``state`` with the leaves at the paths (:func:`path_key`) of ``values`` replaced."""
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = path_key(path)
        if key in values:
            var = var.replace(values[key]) if isinstance(var, nnx.Variable) else values[key]
        flat.append((path, var))
    return nnx.from_flat_state(flat)
