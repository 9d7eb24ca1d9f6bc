"""The fused, chunked causal-LM loss (``lm_head_loss``) against the loss of the full logits
with autodiff (same numbers: loss, counts, gradients of the hidden states and of the head), and
what chunking saves (XLA's compiled temporaries). The whole-model losses against transformers
are in test_step.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.models import OutputHead
from peftjax.train import IGNORE_INDEX, causal_lm_loss
from peftjax.train._losses import lm_head_loss


def _problem(dtype, transposed, B=3, T=13, E=16, V=40, seed=0):
    rs = np.random.RandomState(seed)
    h = jnp.asarray(rs.normal(size=(B, T, E)), dtype)
    w_shape = (V, E) if transposed else (E, V)
    w = jnp.asarray(rs.normal(size=w_shape) * 0.5, jnp.float32)
    labels = rs.randint(0, V, (B, T))
    labels[:, :2] = IGNORE_INDEX           # a prompt
    mask = np.ones((B, T), np.int32)
    mask[1, -4:] = 0                       # right padding
    labels[1, -4:] = IGNORE_INDEX
    mask[2, :3] = 0                        # left padding
    labels[2, :3] = IGNORE_INDEX
    return h, w, jnp.asarray(labels), jnp.asarray(mask)


CASES = [  # dtype, softcap, tied (transposed weight), chunk bytes (None: one chunk)
    (jnp.float32, None, False, None),
    (jnp.float32, 3.0, True, 3 * 40 * 4 * 4),   # 4 positions a chunk: 4 chunks, 3 padded
    (jnp.float32, None, False, 3 * 40 * 4 * 5),  # 5 positions: 3 chunks, 2 padded
    (jnp.bfloat16, None, True, 3 * 40 * 4 * 4),
]


@pytest.mark.parametrize("dtype, softcap, transposed, chunk", CASES,
                         ids=["f32", "f32-softcap-tied-chunked", "f32-chunked", "bf16-chunked"])
def test_lm_head_loss_equals_the_loss_of_the_full_logits(dtype, softcap, transposed, chunk):
    h, w, labels, mask = _problem(dtype, transposed)
    kw = {} if chunk is None else {"chunk_bytes": chunk}

    def fused(h, w):
        head = OutputHead(w, transposed=transposed, softcap=softcap, dtype=dtype)
        return lm_head_loss(h, head, labels, mask, **kw)

    def reference(h, w):
        head = OutputHead(w, transposed=transposed, softcap=softcap, dtype=dtype)
        return causal_lm_loss(head.logits(h), labels, mask)

    got, want = jax.jit(fused)(h, w), jax.jit(reference)(h, w)
    assert float(got[1]) == float(want[1]) == float(((labels[:, 1:] != IGNORE_INDEX) &
                                                     (mask[:, 1:] != 0)).sum())
    assert float(got[2]) == float(want[2])
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert abs(float(got[0]) - float(want[0])) <= tol * abs(float(want[0]))
    g_fused = jax.jit(jax.grad(lambda h, w: fused(h, w)[0], argnums=(0, 1)))(h, w)
    g_ref = jax.jit(jax.grad(lambda h, w: reference(h, w)[0], argnums=(0, 1)))(h, w)
    for a, b in zip(g_fused, g_ref):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=(1e-6 if dtype == jnp.float32 else 2e-2)
                                   * np.abs(b).max())
    # only the hidden states differentiated (a frozen head): the same gradient
    g_h = jax.jit(jax.grad(lambda h: fused(h, w)[0]))(h)
    np.testing.assert_allclose(np.asarray(g_h, np.float32), np.asarray(g_fused[0], np.float32),
                               rtol=0, atol=1e-6 * float(np.abs(np.asarray(g_fused[0], np.float32)).max()))


def test_chunking_keeps_only_a_chunk_of_logits():
    """The compiled gradient's temporaries: full logits [B, T, V] and their softmax are never
    held; with 8 chunks the temporaries are a fraction of the one-chunk loss's."""
    B, T, E, V = 2, 256, 64, 8192
    h = jax.ShapeDtypeStruct((B, T, E), jnp.float32)
    w = jax.ShapeDtypeStruct((E, V), jnp.float32)
    labels = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def temp(**kw):
        f = jax.grad(lambda h, w, y: lm_head_loss(h, OutputHead(w), y, None, **kw)[0])
        return jax.jit(f).lower(h, w, labels).compile().memory_analysis().temp_size_in_bytes

    full_logits = B * T * V * 4
    one, eight = temp(chunk_bytes=full_logits), temp(chunk_bytes=full_logits // 8)
    print(f"temporaries: one chunk {one:,d} B, eight chunks {eight:,d} B "
          f"(full float32 logits {full_logits:,d} B)")
    assert eight < 0.35 * one
    assert eight < 0.5 * full_logits
