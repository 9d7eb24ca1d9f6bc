"""The optimizer: AdamW over the trainable state only, with a warmup + decay schedule and
global-norm gradient clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. ``linear`` and ``cosine`` decay from ``learning_rate`` (after
    ``warmup_steps`` of linear warmup from 0) to ``learning_rate * final_lr_ratio`` at
    ``total_steps``; ``constant`` holds it after the warmup. Weight decay applies to matrices
    only (not to biases or norm scales), as the Hugging Face Trainer does.
    ``max_grad_norm=None`` turns clipping off."""

    learning_rate: float = 2e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate!r} must be > 0")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.schedule != "constant":
            if self.total_steps is None:
                problems.append(f"schedule={self.schedule!r} needs total_steps")
            elif self.total_steps <= self.warmup_steps:
                problems.append(f"total_steps={self.total_steps} must exceed "
                                f"warmup_steps={self.warmup_steps}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            problems.append(f"final_lr_ratio={self.final_lr_ratio!r} must be in [0, 1]")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            problems.append(f"b1={self.b1!r} and b2={self.b2!r} must be in [0, 1)")
        if not self.eps > 0:
            problems.append(f"eps={self.eps!r} must be > 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm={self.max_grad_norm!r} must be > 0 (or None)")
        if problems:
            raise ValueError("invalid OptimizerConfig: " + "; ".join(problems))


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
