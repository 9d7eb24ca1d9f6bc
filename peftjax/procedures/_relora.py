"""ReLoRA (Lialin et al. 2023): high-rank training from a sequence of low-rank updates.

Every ``reset_every`` steps the LoRA factors are merged into the frozen weights and started
again (A as at initialisation with a fresh key, B zero: the model's outputs do not change), the
Adam moments of the factors are pruned by magnitude (``optimizer_reset_ratio`` of each tensor's
entries set to zero, the largest kept: the paper's partial reset; 1.0 resets them fully, 0 keeps
them), and the learning rate restarts: after each reset it rises linearly from zero over
``restart_warmup_steps`` steps, on top of the run's own schedule (the paper's jagged schedule).
After k resets the accumulated change ``W - W0`` of a layer has rank up to ``(k + 1) r`` where
LoRA alone stays at ``r``.

The merged weights are no longer the base checkpoint's, so every checkpoint holds the kernels
of the adapted layers beside the factors (a resumed run continues bit for bit), and the run
saves ``model/`` (the full merged model, Hugging Face format) instead of an adapter, which
alone would be meaningless without the merged base. A full-rank warm start (the paper starts
ReLoRA from a model trained a few thousand steps at full rank) is a ``peft.method: full`` run
whose ``model/`` directory is this run's ``model.path``.

YAML::

    peft: {method: lora, r: 16, target_modules: all-linear}
    procedure: {method: relora, reset_every: 200, optimizer_reset_ratio: 0.99,
                restart_warmup_steps: 20}
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from peftjax.procedures._base import (ProcedureConfig, ProcedureRun, path_key,
                                      register_procedure, replace_leaves)
from peftjax.tuners._lora import lora_layers


def prune_by_magnitude(x: jax.Array, ratio: float) -> jax.Array:
    """``x`` with the ``ratio`` fraction of its entries of smallest magnitude set to zero
    (entries above the ``ratio`` quantile of ``|x|`` are kept)."""
    if ratio <= 0.0:
        return x
    if ratio >= 1.0:
        return jnp.zeros_like(x)
    mag = jnp.abs(x).astype(jnp.float32)
    threshold = jnp.quantile(mag.ravel(), ratio)
    return jnp.where(mag > threshold, x, jnp.zeros_like(x))


def prune_moments(opt_state, ratio: float, prune_path) -> tuple[object, float]:
    """``(opt_state, kept)``: Adam's first and second moments of the leaves whose key path
    ``prune_path(keystr)`` selects pruned by :func:`prune_by_magnitude`; ``kept`` is the
    fraction of those moment entries left non-zero."""
    counts = []

    def prune_tree(tree):
        def f(path, x):
            if not prune_path(jax.tree_util.keystr(path)):
                return x
            y = prune_by_magnitude(x, ratio)
            counts.append((jnp.count_nonzero(y), x.size))
            return y
        return jax.tree_util.tree_map_with_path(f, tree)

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(mu=prune_tree(node.mu), nu=prune_tree(node.nu))
        return node

    new = jax.tree.map(visit, opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
    total = sum(n for _, n in counts)
    kept = sum(k for k, _ in counts) / max(total, 1)
    return new, kept


def _is_factor(keystr: str) -> bool:
    return "'lora_A'" in keystr or "'lora_B'" in keystr


@register_procedure
@dataclasses.dataclass(frozen=True)
class ReLoraConfig(ProcedureConfig):
    """ReLoRA's settings (see the module doc). ``restart_warmup_steps`` defaults to a tenth of
    ``reset_every`` (at least 1)."""

    reset_every: int | None = None
    optimizer_reset_ratio: float = 0.99
    restart_warmup_steps: int | None = None

    method = "relora"

    def __post_init__(self):
        p = []
        if not (isinstance(self.reset_every, int) and self.reset_every >= 1):
            p.append(f"reset_every={self.reset_every!r} must be an integer >= 1 (the steps "
                     "between merges)")
        if not 0.0 <= self.optimizer_reset_ratio <= 1.0:
            p.append(f"optimizer_reset_ratio={self.optimizer_reset_ratio!r} must be in [0, 1] "
                     "(the fraction of Adam's moments zeroed at each reset)")
        w = self.restart_warmup_steps
        if w is not None and not (isinstance(self.reset_every, int) and 1 <= w <= self.reset_every):
            p.append(f"restart_warmup_steps={w!r} must be in [1, reset_every]")
        if p:
            raise ValueError("; ".join(p))

    @property
    def warmup(self) -> int:
        if self.restart_warmup_steps is not None:
            return self.restart_warmup_steps
        return max(1, math.ceil(self.reset_every / 10))

    def problems(self, run_cfg) -> list[str]:
        p = []
        if run_cfg.peft.method != "lora":
            p.append(f"ReLoRA restarts LoRA adapters; peft.method is {run_cfg.peft.method!r} "
                     "(set peft.method: lora)")
            return p
        options = run_cfg.peft.options
        for flag in ("use_dora", "use_qalora"):
            if options.get(flag):
                p.append(f"ReLoRA merges plain LoRA factors into the weights; peft.{flag} is "
                         "set (DoRA's magnitude and QA-LoRA's pooling do not restart that way)")
        if run_cfg.quantization.quant_type is not None:
            p.append(f"ReLoRA merges into the frozen weights every reset_every steps; "
                     f"{run_cfg.quantization.quant_type} (4-bit) weights would be re-quantized "
                     "at each merge, losing precision each time: set quantization.quant_type: "
                     "null")
        return p

    def schedule(self, schedule):
        n, warm = self.reset_every, self.warmup

        def jagged(count):
            since = count % n  # updates since the last reset (count: updates done before)
            ramp = jnp.minimum(1.0, (since + 1) / warm)
            return schedule(count) * jnp.where(count >= n, ramp, 1.0)
        return jagged

    def final_model(self, model):
        return model.merge_and_unload()

    def attach(self, graphdef, trainable, frozen, *, key) -> ProcedureRun:
        return _ReLoraRun(self, graphdef, trainable, frozen, key)


class _ReLoraRun(ProcedureRun):
    changes_frozen = True

    def __init__(self, cfg: ReLoraConfig, graphdef, trainable, frozen, key):
        self.cfg, self.key = cfg, key
        model = nnx.merge(graphdef, trainable, frozen)
        layers = lora_layers(model)
        if not layers:
            raise ValueError("ReLoRA found no LoRA layers in the model")
        frozen_keys = {path_key(p) for p, _ in nnx.to_flat_state(frozen)}
        self.kernels = [f"{name}.kernel" for name, _ in layers]
        missing = [k for k in self.kernels if k not in frozen_keys]
        if missing:
            raise ValueError(f"ReLoRA merges into frozen kernels; {missing[0]} is not frozen "
                             "(is that layer also trained in full, e.g. by modules_to_save?)")
        train_paths = {tuple(p) for p, _ in nnx.to_flat_state(trainable)}
        shardings = jax.tree.map(lambda x: x.sharding, (trainable, frozen))

        def restart(trainable, frozen, key):
            m = nnx.merge(graphdef, trainable, frozen)
            for i, (_, layer) in enumerate(lora_layers(m)):
                layer.restart(jax.random.fold_in(key, i))
            _, tr, fr = nnx.split(m, lambda path, _: tuple(path) in train_paths, ...)
            return tr, fr

        self._restart = jax.jit(restart, donate_argnums=(0, 1), out_shardings=shardings)

    def at_boundary(self, step: int) -> bool:
        return step % self.cfg.reset_every == 0

    def boundary(self, step, trainable, frozen, opt_state):
        trainable, frozen = self._restart(trainable, frozen, jax.random.fold_in(self.key, step))
        opt_state, kept = prune_moments(opt_state, self.cfg.optimizer_reset_ratio, _is_factor)
        return trainable, frozen, opt_state, {"relora_reset": step // self.cfg.reset_every,
                                              "moments_kept": float(kept)}

    def saved_state(self, frozen):
        flat = {path_key(p): v for p, v in nnx.to_flat_state(frozen)}
        return {k: flat[k][...] for k in self.kernels}

    def restored(self, frozen, saved):
        return replace_leaves(frozen, saved)

