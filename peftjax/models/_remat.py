"""Per-block rematerialisation (gradient checkpointing) that really frees each block.

``jax.checkpoint`` saves a block's inputs and recomputes the rest in the backward pass; an
optimization barrier around the recomputation's inputs keeps XLA from merging the recomputed
expressions with their forward-pass twins. XLA:GPU and XLA:TPU keep those barriers until after
scheduling. XLA:CPU removes them before its last common-subexpression pass (``cse_barrier_
expander`` runs ahead of the CSE after layout assignment), which then merges every expression
that depends on a block's inputs alone: the float32 convert of each bf16 weight (XLA:CPU computes
bf16 matrix products in float32), a dequantized 4-bit weight, parts of the recomputed forward.
Measured with ``peftjax memory`` on Llama-2-7B shapes: each added layer kept one layer's weights
in float32 alive from the forward pass to the backward (0.81 GiB per layer at 256 tokens).
A second cost on every backend: the products giving the gradients of a block's trainable
weights (LoRA's ``dA``, ``dB``) feed only the optimizer update at the end of the step, and
XLA:CPU's memory scheduler postponed them there, keeping their operands (each layer's
activations) alive through the whole backward pass.

:func:`call_block` rematerialises through a ``custom_vjp`` whose backward pass adds two data
dependencies no compiler pass removes, both exact (``x + -0.0 == x`` for every float, integers
gain 0, booleans are xor-ed with False):

- on CPU, every array saved for the backward pass is tied to the block's output cotangent (it
  gets ``-0.0`` computed from one element of it), so nothing recomputed equals a forward-pass
  expression or can be scheduled before the cotangent exists;
- on every backend, the cotangents leaving the block (of its input and of its other traced
  inputs) are tied to the block's weight gradients (``-0.0`` from their sum), so those products
  run while their operands are live.

With both, the planner's activations grow by about one block input per layer (see the README's
memory table). Values are unchanged bit for bit; the extra work is elementwise (fused into the
converts on CPU) plus one small reduction per block.

A third XLA:CPU behaviour costs time with or without remat: its fusion pass duplicates cheap
elementwise producers into every consumer, and the gradient of the residual stream is a chain
of elementwise expressions from block to block (BERT's post-norm LayerNorms above all), so each
block's backward fusion recomputed the chain of every block above it (the quickstart's step:
12 fusions reading ~100 arrays each; 8.7 GB accessed per step instead of 6.1). On CPU the
cotangent entering each block's backward pass goes through a conditional whose two branches
return it unchanged; a fusion cannot reach across a conditional, so the chain is computed once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

Array = jax.Array

# Tensors tagged with jax.ad_checkpoint.checkpoint_name inside every block, for "save:" policies.
CHECKPOINT_NAMES = ("qkv", "attn_out", "mlp_hidden")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy(name: str):
    """Validates a remat policy name; returns the jax.checkpoint policy (None saves nothing).

    ``none``: no rematerialisation. ``full``: save only block inputs, recompute the rest.
    ``dots_saveable`` / ``dots_with_no_batch_dims_saveable``: jax's policies of those names.
    ``save:NAME[,NAME...]``: save only the tensors tagged NAME (one of :data:`CHECKPOINT_NAMES`).
    """
    cp = jax.checkpoint_policies
    if name in ("none", "full"):
        return None
    if name in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        return getattr(cp, name)
    if isinstance(name, str) and name.startswith("save:"):
        names = tuple(n.strip() for n in name[len("save:"):].split(",") if n.strip())
        bad = [n for n in names if n not in CHECKPOINT_NAMES]
        if not names or bad:
            raise ValueError(f"remat policy {name!r}: names must be a comma-separated subset of "
                             f"{', '.join(CHECKPOINT_NAMES)}")
        return cp.save_only_these_names(*names)
    raise ValueError(f"unknown remat policy {name!r}; use one of {', '.join(REMAT_POLICIES)} "
                     f"or 'save:NAME,...' with names from {', '.join(CHECKPOINT_NAMES)}")


def call_block(block: nnx.Module, remat: str, x: Array, **kwargs):
    """``block(x, **kwargs)``, rematerialised in the backward pass as ``remat`` says.

    Keyword arguments holding arrays are traced through the checkpoint; the rest (None, ints,
    flags) are constants of the block's program. Outside differentiation (evaluation,
    generation) the block runs as it is."""
    if _compiler_quirks():
        x = _computed_once(x)
    if remat == "none":
        return block(x, **kwargs)
    policy = remat_policy(remat)
    traced = {k: v for k, v in kwargs.items()
              if any(isinstance(a, jax.Array) for a in jax.tree.leaves(v))}
    static = {k: v for k, v in kwargs.items() if k not in traced}
    graphdef, state = nnx.split(block)

    def run(state, x, traced):  # pure: blocks do not mutate their state
        return nnx.merge(graphdef, state)(x, **traced, **static)

    leaves, tree = jax.tree.flatten((state, x, traced))
    n_state = len(jax.tree.leaves(state))
    return _rematerialised(run, policy, tree, n_state)(*leaves)


def _rematerialised(fn, policy, tree, n_state: int):
    """``fn(state, x, traced)`` over flat leaves (the first ``n_state`` are the block's state),
    rematerialised with ``policy`` and the ties of the module doc."""
    checkpointed = jax.checkpoint(lambda *leaves: fn(*jax.tree.unflatten(tree, leaves)),
                                  policy=policy)

    @jax.custom_vjp
    def block(*leaves):
        return fn(*jax.tree.unflatten(tree, leaves))

    def fwd(*primals: CustomVJPPrimal):
        values = [p.value for p in primals]
        perturbed = tuple(bool(p.perturbed) for p in primals)

        def of_differentiated(diff):
            it = iter(diff)
            return checkpointed(*[next(it) if p else v for v, p in zip(values, perturbed)])

        out, pullback = jax.vjp(of_differentiated, [v for v, p in zip(values, perturbed) if p])
        # the pullback is a pytree whose leaves are what the checkpoint saved
        return out, (pullback, perturbed)

    def bwd(res, ct):
        pullback, perturbed = res
        ct = jax.tree.map(_instantiate, ct, is_leaf=lambda c: isinstance(c, SymbolicZero))
        if _compiler_quirks():
            z = _negative_zero(next((c for c in jax.tree.leaves(ct) if _is_float(c)), None))
            if z is not None:
                pullback = jax.tree.map(lambda a: _tie(a, z), pullback)
        (grads,) = pullback(ct)
        it = iter(grads)
        out = [next(it) if p else None for p in perturbed]
        own = [g for g in out[:n_state] if g is not None and _is_float(g)]
        if own:
            z = _negative_zero(sum(jnp.sum(g, dtype=jnp.float32) for g in own))
            out[n_state:] = [None if g is None else _tie(g, z) for g in out[n_state:]]
        return tuple(out)

    block.defvjp(fwd, bwd, symbolic_zeros=True)
    return block


def _compiler_quirks() -> bool:
    """Whether the compiler drops jax.checkpoint's barriers before its last CSE and duplicates
    elementwise chains across blocks (XLA:CPU; see the module doc)."""
    return jax.default_backend() == "cpu"


@jax.custom_vjp
def _computed_once(x):
    """The identity; its cotangent is materialised (see the module doc)."""
    return x


def _computed_once_fwd(x):
    return x, None


def _computed_once_bwd(_, ct):
    if not _is_float(ct):
        return (ct,)
    first = jnp.ravel(ct)[0]
    # ct itself either way: the second branch runs only when ct[0] is NaN, and then adds NaN
    # (branches that differ, and a predicate that is data, keep the conditional in the program)
    return (jax.lax.cond(first == first, lambda c: c, lambda c: c + first, ct),)


_computed_once.defvjp(_computed_once_fwd, _computed_once_bwd)


def _is_float(a) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def _instantiate(c):
    return jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c


def _negative_zero(a) -> Array | None:
    """A float32 ``-0.0`` computed from ``a`` (a scalar, or the first element of an array):
    no compiler folds ``-(|a| * 0)`` for floats (it is NaN for an infinite or NaN ``a``, and
    such a cotangent or gradient spoils the step anyway)."""
    if a is None:
        return None
    first = jnp.ravel(a)[0] if jnp.ndim(a) else a
    return -(jnp.abs(first.astype(jnp.float32)) * 0.0)


def _tie(a, z: Array):
    """``a`` unchanged bit for bit, with a data dependency on ``z`` (``-0.0``)."""
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        return a
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = _tie(jax.random.key_data(a), z)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
    if dtype == jnp.bool_:
        return a ^ (z != 0)
    if jnp.issubdtype(dtype, jnp.number):
        return a + z.astype(dtype)
    return a
