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

import contextlib
import contextvars

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
    traced = {k: v for k, v in kwargs.items() if _holds_arrays(v)}
    static = {k: v for k, v in kwargs.items() if k not in traced}
    graphdef, state = nnx.split(block)
    # The block may be traced again after this call returns (a custom_vjp's forward inside a
    # scan is traced when the scan is differentiated): it runs in a copy of this call's context,
    # with the arrays among the registered context variables passed as arguments, not closed
    # over (a closed-over tracer of the finished trace would leak)
    context = contextvars.copy_context()
    arrays = [_array_or_none(v.get()) for v in _TRACED_CONTEXT]

    def run(state, x, traced, arrays):  # pure: blocks do not mutate their state
        def call():
            for var, a in zip(_TRACED_CONTEXT, arrays):
                if a is not None:
                    var.set(a)
            return nnx.merge(graphdef, state)(x, **traced, **static)
        return context.copy().run(call)

    leaves, tree = jax.tree.flatten((state, x, traced, arrays))
    n_state = len(jax.tree.leaves(state))
    return _rematerialised(run, policy, tree, n_state)(*leaves)


# the index of the block being traced (a Python int, or the loop counter of a scanned stack):
# what adapters fold into their dropout keys, so identical blocks hold identical graphs
_BLOCK: contextvars.ContextVar = contextvars.ContextVar("block_index", default=None)
# context variables that may hold arrays read inside blocks (see call_block)
_TRACED_CONTEXT: list[contextvars.ContextVar] = [_BLOCK]


def traced_context(var: contextvars.ContextVar) -> contextvars.ContextVar:
    """Registers a context variable read inside blocks that may hold an array (a dropout key),
    so a rematerialised block gets its value as an argument (see :func:`call_block`)."""
    _TRACED_CONTEXT.append(var)
    return var


def _array_or_none(a):
    return a if isinstance(a, jax.Array) else None


def current_block():
    """The index of the transformer block whose call is being traced (None outside blocks)."""
    return _BLOCK.get()


@contextlib.contextmanager
def _in_block(index):
    token = _BLOCK.set(index)
    try:
        yield
    finally:
        _BLOCK.reset(token)


def run_blocks(blocks, remat: str, scan: bool, x: Array, per_layer: list[dict], **shared):
    """Runs ``blocks`` in order on ``x``, each through :func:`call_block` with ``**shared`` and
    its own ``per_layer[i]`` keyword arguments; returns ``(x, [extra output of each block])``
    (a block returns ``x`` or ``(x, extra)``; the extra is None for the first kind).

    ``scan``: identical blocks run as one ``jax.lax.scan`` over their stacked weights, so the
    compiler sees one block instead of each (compile time and program size no longer grow with
    depth). Blocks are identical when their graphs (module structure, static attributes,
    adapters) and their per-layer arguments' structures and shapes agree; a pattern that repeats
    with a period (Gemma's local/global layers) is scanned as a super-block of that period, and
    blocks that fit no repeat (LoRA on some layers only) run unrolled. Per-layer arguments that
    are the same object for every scanned block (one mask for all), or hold no arrays (a window
    size), are passed once, the others stacked. Stacking weights inside a jitted step copies
    them in every step; ``peftjax.train.ScanLayout`` holds the frozen ones stacked between
    steps instead (XLA then folds the stack of slices back into the argument: no copy).
    Values agree with the unrolled loop to float rounding (XLA compiles the scanned body as
    its own program). The models scan calls over a KV cache only for several tokens (training
    with a prefix in the cache, prefill): a decode step stays unrolled, as stacking the cache
    would copy it per token.
    """
    blocks = list(blocks)
    extras: list = [None] * len(blocks)

    def unrolled(i, x):
        with _in_block(i):
            x, extras[i] = _split_output(call_block(blocks[i], remat, x, **per_layer[i],
                                                    **shared))
        return x

    if not scan or len(blocks) < 2:
        for i in range(len(blocks)):
            x = unrolled(i, x)
        return x, extras
    splits = [nnx.split(b) for b in blocks]
    keys = [(g, _signature(kw)) for (g, _), kw in zip(splits, per_layer)]
    for start, period, count in _repeats(keys):
        if count < 2:
            for i in range(start, start + period * count):
                x = unrolled(i, x)
            continue
        rows = [list(range(start + q, start + period * count, period)) for q in range(period)]
        graphdefs = [splits[r[0]][0] for r in rows]
        states, stacked_kw, fixed_kw = [], [], []
        for r in rows:
            states.append(jax.tree.map(lambda *a: jnp.stack(a), *[splits[i][1] for i in r]))
            fixed = {k: v for k, v in per_layer[r[0]].items()
                     if all(per_layer[i][k] is v for i in r) or not _holds_arrays(v)}
            fixed_kw.append(fixed)
            stacked_kw.append({k: jax.tree.map(lambda *a: jnp.stack(a),
                                               *[per_layer[i][k] for i in r])
                               for k in per_layer[r[0]] if k not in fixed})

        def body(x, xs, graphdefs=graphdefs, fixed_kw=fixed_kw):
            outs = []
            for graphdef, (index, state, kw), fixed in zip(graphdefs, xs, fixed_kw):
                block = nnx.merge(graphdef, state)
                with _in_block(index):
                    x, extra = _split_output(call_block(block, remat, x, **kw, **fixed,
                                                        **shared))
                outs.append(extra)
            return x, outs

        scanned = _SCANNED.get()
        for r in rows if scanned is not None else ():  # what is stacked, leaf by leaf
            per_block = [jax.tree.leaves(splits[i][1]) for i in r]
            scanned.extend(list(column) for column in zip(*per_block))
        indices = [jnp.asarray(r, jnp.int32) for r in rows]
        x, outs = jax.lax.scan(body, x, list(zip(indices, states, stacked_kw)))
        for q, r in enumerate(rows):
            for j, i in enumerate(r):
                extras[i] = jax.tree.map(lambda a, j=j: a[j], outs[q])
    return x, extras


# set by record_scanned(): the list run_blocks appends to
_SCANNED: contextvars.ContextVar = contextvars.ContextVar("scanned_leaves", default=None)


@contextlib.contextmanager
def record_scanned():
    """While a forward pass is traced in this context, every scanned run of blocks appends,
    for each leaf position of its blocks' state, the list of those leaves in scan order (the
    arrays ``run_blocks`` stacks): what ``peftjax.train.ScanLayout`` holds stacked between
    steps. Yields that list."""
    found: list = []
    token = _SCANNED.set(found)
    try:
        yield found
    finally:
        _SCANNED.reset(token)


def _holds_arrays(value) -> bool:
    return any(isinstance(a, jax.Array) for a in jax.tree.leaves(value))


def _split_output(out):
    return out if isinstance(out, tuple) else (out, None)


def _signature(kw: dict):
    """What must agree between per-layer arguments for their blocks to be scanned together:
    the pytree structure and each array leaf's shape and dtype."""
    leaves, tree = jax.tree.flatten(kw)
    return tree, tuple((jnp.shape(a), jnp.result_type(a)) if isinstance(a, jax.Array) else a
                       for a in leaves)


def _repeats(keys: list, max_period: int = 8) -> list[tuple[int, int, int]]:
    """``(start, period, count)`` segments covering ``keys`` in order: ``count`` repeats of
    ``period`` consecutive keys. The smallest period that makes the whole sequence periodic
    wins (its remainder is one unrolled segment); otherwise runs of equal consecutive keys."""
    n = len(keys)
    for p in range(1, min(max_period, n // 2) + 1):
        if all(keys[i] == keys[i + p] for i in range(n - p)):
            segments = [(0, p, n // p)]
            return segments + ([(p * (n // p), n % p, 1)] if n % p else [])
    segments, i = [], 0
    while i < n:
        j = i
        while j + 1 < n and keys[j + 1] == keys[i]:
            j += 1
        segments.append((i, 1, j - i + 1))
        i = j + 1
    return segments


def _rematerialised(fn, policy, tree, n_state: int):
    """``fn(state, x, traced, arrays)`` over flat leaves (the first ``n_state`` are the block's
    state),
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
