"""The optimizer: AdamW over the trainable state only, with a warmup + decay schedule and
global-norm gradient clipping (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from peftjax.config import SCHEDULES, OptimizerConfig  # noqa: F401  (re-exported)

def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the step count."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, lr * cfg.final_lr_ratio, cfg.total_steps - warm)
    else:
        after = optax.cosine_decay_schedule(lr, cfg.total_steps - warm, alpha=cfg.final_lr_ratio)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decay_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def scale_by_tree(factors) -> optax.GradientTransformation:
    """Multiplies each update leaf by its factor (a pytree like the parameters): per-leaf
    learning rates when it follows the optimizer. Stateless."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig | None = None, *,
                   schedule: optax.Schedule | None = None,
                   lr_scales=None) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with ``schedule`` (default :func:`make_schedule`; a
    procedure such as ReLoRA passes its own), then with ``lr_scales`` (a pytree like the
    trainable state) each leaf's update multiplied by its factor. Initialise it on the
    trainable state only (``optimizer.init(trainable)``): frozen weights get no moments."""
    cfg = cfg or OptimizerConfig()
    parts = [optax.adamw(schedule or make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay, mask=_decay_mask)]
    if cfg.max_grad_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(cfg.max_grad_norm))
    if lr_scales is not None:
        parts.append(scale_by_tree(lr_scales))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)
