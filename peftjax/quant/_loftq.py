"""LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"):
a 4-bit weight and a rank-r LoRA start chosen together so that their sum approximates the
original weight better than the 4-bit weight alone.

Alternating, as PEFT's ``loftq_init``: quantize the residual ``W - L R`` (first ``W`` itself)
to NF4 (bitsandbytes' blockwise format, blocksize 64, no double quantization, as PEFT asks
bitsandbytes for), then take the best rank-r approximation ``L R`` of ``W - dequant(Q)`` from the
SVD (``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_r^T``), ``iters`` times.
"""

from __future__ import annotations

import jax.numpy as jnp

from peftjax.quant._formats import QuantState, dequantize_4bit, quantize_4bit


def low_rank(m_OxI: jnp.ndarray, rank: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(L [out, r], R [r, in])`` with ``L R`` the best rank-``rank`` approximation of ``m``
    (the square root of the singular values on each side, as PEFT splits them)."""
    u, s, vh = jnp.linalg.svd(m_OxI.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def loftq(w_OxI, *, rank: int, iters: int = 1, quant_type: str = "nf4",
          blocksize: int = 64) -> tuple[jnp.ndarray, QuantState, jnp.ndarray, jnp.ndarray]:
    """LoftQ for one weight [out, in] (``iters`` >= 1; ``LoraConfig`` checks its options):
    ``(packed, state, L [out, r], R [r, in])`` with ``dequant(packed, state) + L R`` close to
    ``w`` (float32 factors; the quantized weight keeps ``w``'s dtype as its original dtype)."""
    w = jnp.asarray(w_OxI, jnp.float32)
    residual = w
    for i in range(iters):
        packed, state = quantize_4bit(residual, quant_type=quant_type, blocksize=blocksize,
                                      double_quant=False)
        left, right = low_rank(w - dequantize_4bit(packed, state, jnp.float32), rank)
        if i + 1 < iters:
            residual = w - left @ right
    return packed, state.replace(dtype=jnp.dtype(w_OxI.dtype)), left, right
