"""Blocked Pallas kernels for ``x @ W.T`` and ``dy @ W`` with W stored in 4 bits.

Each grid step loads one tile of packed bytes [bn, bk/2] and its block scales, turns the
nibbles into values in registers (a 16-way select over the code, times the block's absmax) and
multiplies; the full-precision weight never exists in device memory. The high and low nibbles
of a byte are columns 2j and 2j+1, so instead of interleaving them in the kernel the caller
permutes x's columns per K tile (even columns first, then odd) and the kernel does two dots.

The kernels use only portable Pallas (BlockSpecs, ``pl.program_id``, ``pl.when``); they run
with ``interpret=True`` on CPU (what the tests do) and are meant for Mosaic TPU. Output blocks
accumulate in float32 across the reduction axis (the output BlockSpec ignores it, so the block
stays resident).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_TILES = (512, 256, 128, 64, 32, 16, 8)


def _lookup(q, code: tuple[float, ...]):
    """code[q] for int q in [0, 16) as a select chain (no gather inside the kernel)."""
    out = jnp.zeros(q.shape, jnp.float32)
    for i, c in enumerate(code):
        if c != 0.0:
            out = jnp.where(q == i, jnp.float32(c), out)
    return out


def _dequant_halves(p, s, code, blocksize, dtype):
    """Packed tile [bn, bk/2] + scales [bn, bk/blocksize] -> (even columns, odd columns)."""
    s_full = jnp.repeat(s, blocksize // 2, axis=1)
    hi = (_lookup((p >> 4).astype(jnp.int32), code) * s_full).astype(dtype)
    lo = (_lookup((p & 0xF).astype(jnp.int32), code) * s_full).astype(dtype)
    return hi, lo


def pick_tile(dim: int, want: int, multiple: int = 1) -> int | None:
    """The largest tile <= want from 512..8 dividing ``dim`` and a multiple of ``multiple``."""
    for t in _TILES:
        if t <= want and dim % t == 0 and t % multiple == 0:
            return t
    return None


def permute_k(x_MxK, bk: int):
    """Within each K tile of width bk: even columns first, then odd (matches the nibbles)."""
    m, k = x_MxK.shape
    return x_MxK.reshape(m, k // bk, bk // 2, 2).swapaxes(-1, -2).reshape(m, k)


def unpermute_k(x_MxK, bk: int):
    m, k = x_MxK.shape
    return x_MxK.reshape(m, k // bk, 2, bk // 2).swapaxes(-1, -2).reshape(m, k)


@functools.partial(jax.jit, static_argnames=("transpose", "code", "blocksize", "bm", "bn", "bk",
                                             "dtype", "interpret"))
def matmul(a, w_packed_NxK2, scales_NxKB, *, transpose: bool, code, blocksize, bm, bn, bk, dtype,
           interpret=False):
    """float32 ``x @ W.T`` [M, N] (x [M, K], already permuted by :func:`permute_k`) or, with
    ``transpose``, ``dy @ W`` [M, K] in the permuted column order (dy [M, N]). M, N, K must be
    multiples of bm, bn, bk. The grid's last axis is the reduction (K, or N for ``dy @ W``)."""
    m = a.shape[0]
    n, k = w_packed_NxK2.shape[0], 2 * w_packed_NxK2.shape[1]
    half = bk // 2

    def kernel(a_ref, p_ref, s_ref, o_ref):
        @pl.when(pl.program_id(2) == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

        hi, lo = _dequant_halves(p_ref[...], s_ref[...], code, blocksize, dtype)
        a = a_ref[...].astype(dtype)
        if transpose:  # [bm, bn] @ [bn, bk/2] for each half of the output tile
            o_ref[:, :half] += jnp.dot(a, hi, preferred_element_type=jnp.float32)
            o_ref[:, half:] += jnp.dot(a, lo, preferred_element_type=jnp.float32)
        else:  # [bm, bk/2] . [bn, bk/2]^T for each half of the input tile
            dims = (((1,), (1,)), ((), ()))
            o_ref[...] += (
                jax.lax.dot_general(a[:, :half], hi, dims, preferred_element_type=jnp.float32)
                + jax.lax.dot_general(a[:, half:], lo, dims, preferred_element_type=jnp.float32))

    if transpose:  # grid (i, kk, j): j over N is the reduction
        grid, out = (m // bm, k // bk, n // bn), (m, k)
        a_spec = pl.BlockSpec((bm, bn), lambda i, kk, j: (i, j))
        w_index = lambda i, kk, j: (j, kk)  # noqa: E731
        out_spec = pl.BlockSpec((bm, bk), lambda i, kk, j: (i, kk))
    else:  # grid (i, j, kk): kk over K is the reduction
        grid, out = (m // bm, n // bn, k // bk), (m, n)
        a_spec = pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))
        w_index = lambda i, j, kk: (j, kk)  # noqa: E731
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[a_spec, pl.BlockSpec((bn, half), w_index),
                  pl.BlockSpec((bn, bk // blocksize), w_index)],
        out_specs=out_spec, out_shape=jax.ShapeDtypeStruct(out, jnp.float32),
        interpret=interpret,
    )(a, w_packed_NxK2, scales_NxKB)
