"""``nf4_matmul``: y = x @ W.T with W in 4 bits, differentiable in x only (W is frozen).

The backward pass computes dx = dy @ W with the same dequantize-in-the-tile approach and saves
only the packed weight and its scales as residuals (never a dequantized copy); there is no dW.

Dispatch (``impl=None``): ``$PEFTJAX_NF4_IMPL`` if set, else ``"xla"`` on every backend, the
dequantize-then-dot reference. The Pallas kernels (``"pallas"``, written for Mosaic TPU) are
verified only in interpret mode so far, and there is no Mosaic GPU kernel yet, so they are
opt-in until a hardware run validates them. ``"interpret"`` runs them on CPU (the tests).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from kernels_pallas.nf4_matmul import kernel as K
from kernels_pallas.nf4_matmul.reference import nf4_matmul_reference, nf4_matmul_t_reference

IMPLS = ("xla", "pallas", "interpret")


def default_impl() -> str:
    return os.environ.get("PEFTJAX_NF4_IMPL", "xla")


def _tiles(m: int, n: int, k: int, blocksize: int):
    bk = K.pick_tile(k, 512, multiple=max(blocksize, 16))
    bn = K.pick_tile(n, 256)
    if bk is None or bn is None:
        raise ValueError(
            f"the 4-bit Pallas kernel cannot tile W [{n}, {k}] with blocksize {blocksize}: K must "
            f"be a multiple of max(blocksize, 16) and of a tile in 8..512, and N a multiple of 8. "
            "Use impl='xla' for this layer.")
    bm = min(128, -(-m // 8) * 8)
    return bm, bn, bk


def _apply(a, w_packed, scales, code, blocksize, dtype, impl, transpose):
    """``a @ W.T`` (x [..., K] -> [..., N]) or, with ``transpose``, ``a @ W`` (dy -> dx)."""
    # The barrier ties the dequantization to its input: XLA may not run it early (holding
    # every layer's float weight at once) nor merge the forward and backward dequantizations
    # (which would keep a float copy alive from the forward pass to the backward pass).
    a, w_packed, scales = jax.lax.optimization_barrier((a, w_packed, scales))
    if impl == "xla":
        ref = nf4_matmul_t_reference if transpose else nf4_matmul_reference
        return ref(a, w_packed, scales, jnp.asarray(code), dtype=dtype)
    a2 = a.reshape(-1, a.shape[-1])
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    bm, bn, bk = _tiles(a2.shape[0], n, k, blocksize)
    m = a2.shape[0]
    a2 = jnp.pad(a2, ((0, -m % bm), (0, 0)))
    kw = dict(code=code, blocksize=blocksize, bm=bm, bn=bn, bk=bk, dtype=dtype,
              interpret=impl == "interpret")
    if transpose:
        out = K.unpermute_k(K.matmul(a2, w_packed, scales, transpose=True, **kw), bk)
    else:
        out = K.matmul(K.permute_k(a2, bk), w_packed, scales, transpose=False, **kw)
    return out[:m].astype(dtype).reshape(*a.shape[:-1], -1)


@functools.cache
def _op(code: tuple, blocksize: int, dtype, impl: str):
    dtype = jnp.dtype(dtype)
    apply = functools.partial(_apply, code=code, blocksize=blocksize, dtype=dtype, impl=impl)

    @jax.custom_vjp
    def op(x, w_packed, scales):
        return apply(x, w_packed, scales, transpose=False)

    def fwd(x, w_packed, scales):
        # residuals: the packed weight and scales (x is not needed: there is no dW); the empty
        # array only carries x's dtype
        return (apply(x, w_packed, scales, transpose=False),
                (w_packed, scales, jnp.zeros((0,), x.dtype)))

    def bwd(res, dy):
        w_packed, scales, like_x = res
        dx = apply(dy, w_packed, scales, transpose=True).astype(like_x.dtype)
        return dx, None, None  # the weight is frozen: no cotangent

    op.defvjp(fwd, bwd)
    return op


def nf4_matmul(x, w_packed_NxK2, scales_NxKB, *, code, blocksize: int, dtype=None,
               impl: str | None = None) -> jax.Array:
    """``x @ W.T`` [..., N] for a 4-bit W (see ``reference.py`` for the layout).

    ``code``: the 16 code values (NF4 or FP4); ``blocksize``: values per absmax (32..4096);
    ``dtype``: compute dtype (default x's); accumulation is float32. Gradients flow to ``x``
    only. The Pallas path pads M to its tile; K and N must tile (else a ValueError says so).
    """
    impl = impl or default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose one of {IMPLS}.")
    code = tuple(float(c) for c in code)
    return _op(code, int(blocksize), jnp.dtype(dtype or x.dtype), impl)(
        x, w_packed_NxK2, jax.lax.stop_gradient(scales_NxKB))
