"""Plain-jnp 4-bit matmul: dequantize the whole weight, then one dot. The definition every
kernel is tested against, and the path used on CPU.

Layout (bitsandbytes' bytes, seen two-dimensionally): the weight W [N, K] (PyTorch's
[out, in]) is stored as ``w_packed_NxK2`` uint8 [N, K/2], value ``2j`` of a row in the high
nibble of byte ``j``; ``scales_NxKB`` float32 [N, K/blocksize] holds each block's absmax (double
quantization already undone); ``code`` float32 [16] maps a nibble to its value in [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unpack_NxK(w_packed_NxK2: jax.Array) -> jax.Array:
    """uint8 [N, K/2] -> int32 nibbles [N, K] (high nibble first)."""
    n, k2 = w_packed_NxK2.shape
    hi = (w_packed_NxK2 >> 4).astype(jnp.int32)
    lo = (w_packed_NxK2 & 0xF).astype(jnp.int32)
    return jnp.stack([hi, lo], axis=-1).reshape(n, 2 * k2)


def dequantize_NxK(w_packed_NxK2, scales_NxKB, code, dtype=jnp.float32) -> jax.Array:
    """W [N, K] in ``dtype``: ``code[nibble] * absmax`` in float32 (as bitsandbytes), then cast."""
    q_NxK = unpack_NxK(w_packed_NxK2)
    n, k = q_NxK.shape
    kb = scales_NxKB.shape[1]
    vals = jnp.asarray(code, jnp.float32)[q_NxK].reshape(n, kb, k // kb)
    return (vals * scales_NxKB[:, :, None].astype(jnp.float32)).reshape(n, k).astype(dtype)


def nf4_matmul_reference(x_MxK, w_packed_NxK2, scales_NxKB, code, *, dtype=None) -> jax.Array:
    """``x @ W.T`` [..., N] with W dequantized in ``dtype`` (default x's dtype); f32 accumulation."""
    dtype = jnp.dtype(dtype or x_MxK.dtype)
    w_NxK = dequantize_NxK(w_packed_NxK2, scales_NxKB, code, dtype)
    return jnp.einsum("...k,nk->...n", x_MxK.astype(dtype), w_NxK,
                      preferred_element_type=jnp.float32).astype(dtype)


def nf4_matmul_t_reference(dy_MxN, w_packed_NxK2, scales_NxKB, code, *, dtype=None) -> jax.Array:
    """``dy @ W`` [..., K]: the input gradient of :func:`nf4_matmul_reference`."""
    dtype = jnp.dtype(dtype or dy_MxN.dtype)
    w_NxK = dequantize_NxK(w_packed_NxK2, scales_NxKB, code, dtype)
    return jnp.einsum("...n,nk->...k", dy_MxN.astype(dtype), w_NxK,
                      preferred_element_type=jnp.float32).astype(dtype)
