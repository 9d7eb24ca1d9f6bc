"""The trainable/frozen split and the jitted train and eval steps.

Inside jit the model is pure pytrees: ``nnx.merge(graphdef, trainable, frozen)`` rebuilds it,
gradients are taken with respect to ``trainable`` only (no gradient buffer exists for a frozen
weight), and the optimizer state covers the trainable leaves only.

Example::

    graphdef, trainable, frozen = split_model(peft_model)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4))
    opt_state = optimizer.init(trainable)
    train_step = make_train_step(graphdef, optimizer, task="causal_lm")
    for i, batch in enumerate(batches):
        trainable, opt_state, metrics = train_step(trainable, opt_state, frozen, batch,
                                                   jax.random.key(i))
    nnx.update(peft_model, trainable)   # write the trained adapters back into the model
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from peftjax.models import _layers as L
from peftjax.train._losses import LOSSES, model_loss_sums
from peftjax.tuners._peft_model import PeftModel

Batch = dict  # "input_ids" [B, T], "attention_mask" [B, T], "labels", optional model inputs


def trainable_paths(model: nnx.Module, modules: tuple[str, ...] | None = None) -> frozenset[tuple]:
    """State paths that train: the PEFT model's ``trainable_mask()``; for a plain model every
    parameter (full fine-tuning), or with ``modules`` only the parameters inside the modules of
    those dotted names (e.g. ``("classifier",)``: train the head only)."""
    if isinstance(model, PeftModel):
        if modules is not None:
            raise ValueError("modules= selects parameters of a plain model; a PeftModel trains "
                             "what its config says (use modules_to_save)")
        return frozenset(tuple(p) for p, on in nnx.to_flat_state(model.trainable_mask()) if on)
    paths = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    if modules is None:
        return frozenset(paths)
    chosen = frozenset(p for p in paths if any(
        ".".join(map(str, p)).startswith(m + ".") for m in modules))
    if not chosen:
        names = sorted({".".join(map(str, p[:-1])) for p in paths})
        raise ValueError(f"modules={list(modules)} match no parameters; modules of this model "
                         f"include: {', '.join(names[-8:])}")
    return chosen


def split_model(model: nnx.Module, *, modules: tuple[str, ...] | None = None
                ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen)`` by the one trainable mask (see :func:`trainable_paths`).

    The states hold the model's own arrays (no copy). The train step donates ``trainable``, so
    after training write the result back with ``nnx.update(model, trainable)``.
    """
    paths = trainable_paths(model, modules)
    if not paths:
        raise ValueError("nothing to train: the model has no trainable parameters")
    return nnx.split(model, lambda path, _: tuple(path) in paths, ...)


def set_remat(model: nnx.Module, policy: str) -> None:
    """Rematerialises every transformer block in the backward pass with ``policy``: ``none``,
    ``full``, ``dots_saveable``, ``dots_with_no_batch_dims_saveable`` or
    ``save:NAME[,NAME...]`` with names from ``qkv``, ``attn_out``, ``mlp_hidden``.
    Call it before :func:`split_model` (the policy is part of the graph)."""
    L.remat_policy(policy)  # validates
    _set_on_stacks(model, "remat", policy, "rematerialise")


def set_scan_layers(model: nnx.Module, scan: bool = True) -> None:
    """Runs identical transformer blocks as one ``jax.lax.scan`` in training and evaluation
    (and prefill; decode steps stay unrolled): the compiler sees one block, so compile time
    stops growing with depth. Hold the frozen weights stacked between steps
    (:class:`~peftjax.train.ScanLayout`, as ``train.scan_layers`` runs do), or the step stacks
    them into a copy in every step. Blocks differing in structure (adapters on some layers
    only) run unrolled. Call it before :func:`split_model` (the setting is part of the
    graph)."""
    _set_on_stacks(model, "scan_layers", bool(scan), "scan")


def _set_on_stacks(model: nnx.Module, attr: str, value, what: str) -> None:
    """Sets the block-loop setting ``attr`` on every block stack of ``model``."""
    found = False
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, attr):
            setattr(module, attr, value)
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to {what}")


def _forward_sums(graphdef, task, trainable, frozen, batch: Batch, rng):
    return model_loss_sums(nnx.merge(graphdef, trainable, frozen), batch, task=task,
                           dropout_rng=rng)


def _check_batch(batch: Batch, accum_steps: int) -> int:
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"the batch has no {key!r}; it has {sorted(batch)}")
    B = batch["input_ids"].shape[0]
    if B % accum_steps:
        raise ValueError(f"batch size {B} is not divisible by accum_steps={accum_steps}")
    return B


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *,
                    task: str, accum_steps: int = 1, context=None, layout=None):
    """The jitted ``train_step(trainable, opt_state, frozen, batch, rng)`` ->
    ``(trainable, opt_state, metrics)``.

    ``trainable`` and ``opt_state`` are donated (their buffers are reused for the result).
    ``frozen`` is an argument, never a constant baked into the program. ``rng`` (a key, or None
    for no dropout) drives dropout in the model and in LoRA. With ``accum_steps > 1`` the batch
    is split into that many microbatches whose gradients are summed, so the update equals one
    step on the whole batch while activations exist for one microbatch at a time.
    The loss is the mean over all target tokens (or examples) of the batch. ``context``: a
    callable returning a context manager entered while the step is traced (a procedure's
    training-only model behaviour, e.g. LongLoRA's shifted sparse attention).
    ``metrics``: ``loss``, ``accuracy``, ``targets`` (count) and ``grad_norm`` (before
    clipping). ``layout``: a :class:`~peftjax.train.ScanLayout`; ``frozen`` is then its
    stacked form (scanned blocks' weights held stacked, not stacked again in every step).
    """
    if task not in LOSSES:
        raise ValueError(f"task={task!r} has no training loss; use one of {', '.join(LOSSES)}")
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1")

    def sums_and_grads(trainable, frozen, batch, rng, mean: bool):
        """Gradients of the loss sum (``mean``: of the mean loss, the count being a constant:
        its 1/n enters the backward pass as the seed, instead of a pass over every gradient
        afterwards, which also held a scaled copy of them) and the sums."""
        def f(tr):
            loss_sum, n, correct = _forward_sums(graphdef, task, tr, frozen, batch, rng)
            seed = loss_sum / jnp.maximum(n, 1.0) if mean else loss_sum
            return seed, (loss_sum, n, correct)
        (_, (loss_sum, n, correct)), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        return grads, jnp.stack([loss_sum, n, correct])

    def step(trainable, opt_state, frozen, batch, rng):
        if layout is not None:
            frozen = layout.unstack(frozen)
        if context is not None:
            with context():
                return plain_step(trainable, opt_state, frozen, batch, rng)
        return plain_step(trainable, opt_state, frozen, batch, rng)

    def plain_step(trainable, opt_state, frozen, batch, rng):
        B = _check_batch(batch, accum_steps)
        if accum_steps == 1:
            grads, sums = sums_and_grads(trainable, frozen, batch, rng, True)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum_steps, B // accum_steps) + x.shape[1:]),
                                 batch)

            def body(carry, i_mb):
                i, mb = i_mb
                g, s = sums_and_grads(trainable, frozen, mb,
                                      None if rng is None else jax.random.fold_in(rng, i), False)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((3,), jnp.float32))
            (grads, sums), _ = jax.lax.scan(body, zero, (jnp.arange(accum_steps), micro))
            grads = jax.tree.map(lambda g: g / jnp.maximum(sums[1], 1.0).astype(g.dtype), grads)
        n = jnp.maximum(sums[1], 1.0)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": sums[0] / n, "accuracy": sums[2] / n, "targets": sums[1],
                   "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(graphdef: nnx.GraphDef, *, task: str):
    """The jitted ``eval_step(trainable, frozen, batch)`` -> sums ``{"loss_sum", "targets",
    "correct"}`` (no dropout). Add them over batches and call :func:`summarize`."""
    if task not in LOSSES:
        raise ValueError(f"task={task!r} has no loss; use one of {', '.join(LOSSES)}")

    def step(trainable, frozen, batch):
        _check_batch(batch, 1)
        loss_sum, n, correct = _forward_sums(graphdef, task, trainable, frozen, batch, None)
        return {"loss_sum": loss_sum, "targets": n, "correct": correct}

    return jax.jit(step)


def summarize(sums: dict, *, task: str) -> dict[str, float]:
    """Mean loss, accuracy and (causal LM) perplexity from summed eval-step outputs."""
    n = max(float(sums["targets"]), 1.0)
    loss = float(sums["loss_sum"]) / n
    out = {"loss": loss, "accuracy": float(sums["correct"]) / n, "targets": int(sums["targets"])}
    if task == "causal_lm":
        out["perplexity"] = math.exp(min(loss, 80.0))  # capped: exp overflows past ~709
    return out
