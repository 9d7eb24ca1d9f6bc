"""``nf4_matmul``: y = x @ W.T with W in 4 bits, differentiable in x only (W is frozen).

The backward pass computes dx = dy @ W with the same dequantize-in-the-tile approach and saves
only the packed weight and its scales as residuals (never a dequantized copy); there is no dW.

Dispatch (``impl=None``): TPU runs the Pallas kernels; CPU and GPU run the XLA reference.
(A Mosaic GPU kernel is not written yet, so GPUs use XLA's dequantize-then-dot.) ``impl`` can
force ``"xla"``, ``"pallas"`` or ``"interpret"`` (the Pallas kernels interpreted, for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.nf4_matmul import kernel as K
from kernels_pallas.nf4_matmul.reference import nf4_matmul_reference, nf4_matmul_t_reference

IMPLS = ("xla", "pallas", "interpret")


def default_impl() -> str:
    return "pallas" if jax.default_backend() == "tpu" else "xla"


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


def _pallas_nt(x2, w_packed, scales, code, blocksize, dtype, interpret):
    m, k = x2.shape
    bm, bn, bk = _tiles(m, w_packed.shape[0], k, blocksize)
    mp = -(-m // bm) * bm
    xp = K.permute_k(jnp.pad(x2, ((0, mp - m), (0, 0))), bk)
    y = K.matmul_nt(xp, w_packed, scales, code=code, blocksize=blocksize, bm=bm, bn=bn, bk=bk,
                    dtype=dtype, interpret=interpret)
    return y[:m]


def _pallas_nn(dy2, w_packed, scales, code, blocksize, dtype, interpret):
    m, n = dy2.shape
    k = 2 * w_packed.shape[1]
    bm, bn, bk = _tiles(m, n, k, blocksize)
    mp = -(-m // bm) * bm
    dyp = jnp.pad(dy2, ((0, mp - m), (0, 0)))
    dx = K.matmul_nn(dyp, w_packed, scales, code=code, blocksize=blocksize, bm=bm, bn=bn, bk=bk,
                     dtype=dtype, interpret=interpret)
    return K.unpermute_k(dx, bk)[:m]


@functools.cache
def _op(code: tuple, blocksize: int, dtype, impl: str):
    dtype = jnp.dtype(dtype)

    def forward(x, w_packed, scales):
        # The barrier ties the dequantization to x: XLA may not run it early (holding every
        # layer's float weight at once) nor merge it with the backward pass's (which would keep
        # a dequantized copy alive from forward to backward).
        x, w_packed, scales = jax.lax.optimization_barrier((x, w_packed, scales))
        if impl == "xla":
            return nf4_matmul_reference(x, w_packed, scales, jnp.asarray(code), dtype=dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = _pallas_nt(x2, w_packed, scales, code, blocksize, dtype, impl == "interpret")
        return y.astype(dtype).reshape(*x.shape[:-1], -1)

    def backward_dx(dy, w_packed, scales):
        dy, w_packed, scales = jax.lax.optimization_barrier((dy, w_packed, scales))
        if impl == "xla":
            return nf4_matmul_t_reference(dy, w_packed, scales, jnp.asarray(code), dtype=dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = _pallas_nn(dy2, w_packed, scales, code, blocksize, dtype, impl == "interpret")
        return dx.astype(dtype).reshape(*dy.shape[:-1], -1)

    @jax.custom_vjp
    def op(x, w_packed, scales):
        return forward(x, w_packed, scales)

    def fwd(x, w_packed, scales):
        # residuals: the packed weight and scales (x is not needed: there is no dW); the empty
        # array only carries x's dtype
        return forward(x, w_packed, scales), (w_packed, scales, jnp.zeros((0,), x.dtype))

    def bwd(res, dy):
        w_packed, scales, like_x = res
        dx = backward_dx(dy, w_packed, scales).astype(like_x.dtype)
        return dx, None, jnp.zeros_like(scales)

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
