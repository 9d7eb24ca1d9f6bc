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


@functools.partial(jax.jit, static_argnames=("code", "blocksize", "bm", "bn", "bk", "dtype",
                                             "interpret"))
def matmul_nt(x_MxK, w_packed_NxK2, scales_NxKB, *, code, blocksize, bm, bn, bk, dtype,
              interpret=False):
    """f32 ``x @ W.T`` [M, N]; M, N, K must be multiples of bm, bn, bk; x already permuted."""
    m, k = x_MxK.shape
    n = w_packed_NxK2.shape[0]
    half = bk // 2

    def kernel(x_ref, p_ref, s_ref, o_ref):
        @pl.when(pl.program_id(2) == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

        hi, lo = _dequant_halves(p_ref[...], s_ref[...], code, blocksize, dtype)
        x = x_ref[...].astype(dtype)
        dims = (((1,), (1,)), ((), ()))
        o_ref[...] += (jax.lax.dot_general(x[:, :half], hi, dims, preferred_element_type=jnp.float32)
                       + jax.lax.dot_general(x[:, half:], lo, dims,
                                             preferred_element_type=jnp.float32))

    return pl.pallas_call(
        kernel,
        grid=(m // bm, n // bn, k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bn, half), lambda i, j, kk: (j, kk)),
                  pl.BlockSpec((bn, bk // blocksize), lambda i, j, kk: (j, kk))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
        interpret=interpret,
    )(x_MxK, w_packed_NxK2, scales_NxKB)


@functools.partial(jax.jit, static_argnames=("code", "blocksize", "bm", "bn", "bk", "dtype",
                                             "interpret"))
def matmul_nn(dy_MxN, w_packed_NxK2, scales_NxKB, *, code, blocksize, bm, bn, bk, dtype,
              interpret=False):
    """f32 ``dy @ W`` [M, K] in the permuted column order (see :func:`permute_k`)."""
    m, n = dy_MxN.shape
    k = 2 * w_packed_NxK2.shape[1]
    half = bk // 2

    def kernel(dy_ref, p_ref, s_ref, o_ref):
        @pl.when(pl.program_id(2) == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

        hi, lo = _dequant_halves(p_ref[...], s_ref[...], code, blocksize, dtype)
        dy = dy_ref[...].astype(dtype)
        o_ref[:, :half] += jnp.dot(dy, hi, preferred_element_type=jnp.float32)
        o_ref[:, half:] += jnp.dot(dy, lo, preferred_element_type=jnp.float32)

    return pl.pallas_call(
        kernel,
        grid=(m // bm, k // bk, n // bn),
        in_specs=[pl.BlockSpec((bm, bn), lambda i, kk, j: (i, j)),
                  pl.BlockSpec((bn, half), lambda i, kk, j: (j, kk)),
                  pl.BlockSpec((bn, bk // blocksize), lambda i, kk, j: (j, kk))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, kk, j: (i, kk)),
        out_shape=jax.ShapeDtypeStruct((m, k), jnp.float32),
        interpret=interpret,
    )(dy_MxN, w_packed_NxK2, scales_NxKB)
