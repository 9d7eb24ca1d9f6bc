"""The optimizer: AdamW over the trainable state only, with a warmup + decay schedule and
global-norm gradient clipping (optax)."""

from __future__ import annotations

import jax
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


def make_optimizer(cfg: OptimizerConfig | None = None) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with :func:`make_schedule`. Initialise it on the
    trainable state only (``optimizer.init(trainable)``): frozen weights get no moments."""
    cfg = cfg or OptimizerConfig()
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
