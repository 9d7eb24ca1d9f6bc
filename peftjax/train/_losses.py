"""Losses as sums over targets, so microbatches and devices add up exactly.

Each returns ``(loss_sum, n_targets, n_correct)`` in float32; the mean loss is
``loss_sum / n_targets``. Labels equal to :data:`IGNORE_INDEX` (-100, as in transformers) do
not count: the data pipeline sets them on prompt and padding tokens.

A causal LM's loss is computed from its final hidden states by :func:`lm_head_loss` wherever
the head is a plain linear map (:func:`model_loss_sums` picks it): the logits exist one chunk of
the sequence at a time (at most :data:`LOSS_CHUNK_BYTES` of float32 logits; a 128k vocabulary at
2,048 tokens would otherwise hold 1 GiB per sequence, several times over), and the gradient of
the logits is formed in the same pass (``softmax - onehot``), so neither the logits nor their
softmax are kept for the backward pass: it only scales the hidden states' gradient computed
there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from peftjax.data._formats import IGNORE_INDEX  # noqa: F401  (labels the data marks ignored)


def _token_ce(logits_NV, labels_N, valid_N):
    logp_NV = jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1)
    safe = jnp.where(valid_N, labels_N, 0)
    nll_N = -jnp.take_along_axis(logp_NV, safe[..., None], axis=-1)[..., 0]
    v = valid_N.astype(jnp.float32)
    correct = (jnp.argmax(logits_NV, axis=-1) == labels_N).astype(jnp.float32) * v
    return jnp.sum(nll_N * v), jnp.sum(v), jnp.sum(correct)


def next_token_targets(labels_BT, attention_mask_BT=None):
    """``(targets [B, T], valid [B, T])``: position t predicts ``labels[t + 1]``; the last
    position, ignored labels and padding are not targets. (Shifting the labels, not slicing
    the logits: the slice's backward pass writes a padded copy of the whole logits.)"""
    pad = jnp.full((labels_BT.shape[0], 1), IGNORE_INDEX, labels_BT.dtype)
    targets = jnp.concatenate([labels_BT[:, 1:], pad], axis=1)
    valid = targets != IGNORE_INDEX
    if attention_mask_BT is not None:
        valid = valid & (jnp.pad(attention_mask_BT[:, 1:], ((0, 0), (0, 1))) != 0)
    return targets, valid


def causal_lm_loss(logits_BTV, labels_BT, attention_mask_BT=None):
    """Next-token cross entropy: position t predicts ``labels[t + 1]`` (labels aligned with the
    inputs, as transformers' ``labels=input_ids``). Padding is ignored through the mask too."""
    return _token_ce(logits_BTV, *next_token_targets(labels_BT, attention_mask_BT))


# float32 logits one chunk of lm_head_loss holds at most (the whole batch, a slice of the
# sequence); a smaller chunk means more, smaller steps of its loop
LOSS_CHUNK_BYTES = 64 * 2**20


def lm_head_loss(hidden_BTE, head, labels_BT, attention_mask_BT=None, *,
                 chunk_bytes: int = LOSS_CHUNK_BYTES):
    """:func:`causal_lm_loss` of ``head.logits(hidden)`` (``head``: the model's
    :class:`peftjax.models.OutputHead`) without the logits ever existing in full: the sequence
    is split into chunks of at most ``chunk_bytes`` of float32 logits for the whole batch, and
    each chunk's loss, accuracy and gradients (for the hidden states and, when it trains, the
    head's weight) are computed in one pass. The same numbers as the unchunked loss up to
    float32 rounding."""
    targets, valid = next_token_targets(labels_BT, attention_mask_BT)
    B, T, _ = hidden_BTE.shape
    V = head.weight.shape[0 if head.transposed else 1]
    per_position = max(B * V * 4, 1)
    n = max(1, math.ceil(T / max(chunk_bytes // per_position, 1)))
    size = math.ceil(T / n)
    pad = n * size - T
    if pad:  # positions past the end are no targets
        hidden_BTE = jnp.pad(hidden_BTE, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    fused = _fused_head_ce(head.transposed, head.softcap, jnp.dtype(head.dtype), n)
    return fused(hidden_BTE, head.weight, targets, valid)


def _head_ce_chunk(h, w, targets, valid, *, transposed, softcap, dtype, grad_h, grad_w):
    """One chunk [B, C, ...]: loss sum, target count, correct count, and the gradients of the
    loss sum for ``h`` and ``w`` (None where not asked)."""
    f32 = jnp.float32
    wd = w.astype(dtype)
    logits = jnp.dot(h.astype(dtype), wd.T if transposed else wd)
    if softcap is not None:
        t = jnp.tanh(logits / softcap)
        logits = t * softcap
    l32 = logits.astype(f32)
    lse = jax.nn.logsumexp(l32, axis=-1)
    safe = jnp.where(valid, targets, 0)
    picked = jnp.take_along_axis(l32, safe[..., None], axis=-1)[..., 0]
    v = valid.astype(f32)
    sums = (jnp.sum((lse - picked) * v), jnp.sum(v),
            jnp.sum((jnp.argmax(logits, axis=-1) == targets).astype(f32) * v))
    if not (grad_h or grad_w):
        return sums, None, None
    onehot = jnp.arange(l32.shape[-1], dtype=safe.dtype) == safe[..., None]
    d = ((jnp.exp(l32 - lse[..., None]) - onehot) * v[..., None]).astype(dtype)
    if softcap is not None:
        d = d * (1 - t * t)
    dh = dw = None
    if grad_h:
        dh = jnp.dot(d, wd if transposed else wd.T).astype(h.dtype)
    if grad_w:
        eq = "btv,bte->ve" if transposed else "bte,btv->ev"
        args = (d, h.astype(dtype)) if transposed else (h.astype(dtype), d)
        dw = jnp.einsum(eq, *args, preferred_element_type=f32)
    return sums, dh, dw


@functools.cache
def _fused_head_ce(transposed: bool, softcap, dtype, n_chunks: int):
    """``ce(h [B, T, E], w, targets [B, T], valid [B, T]) -> (loss_sum, n, correct)`` over
    ``n_chunks`` chunks of the sequence, with the gradients formed in the forward pass."""
    static = dict(transposed=transposed, softcap=softcap, dtype=dtype)

    def run(h, w, targets, valid, grad_h, grad_w):
        chunk = functools.partial(_head_ce_chunk, **static, grad_h=grad_h, grad_w=grad_w)
        if n_chunks == 1:
            return chunk(h, w, targets, valid)
        B, T, E = h.shape

        def split(a):  # [B, T, ...] -> [n, B, T / n, ...]
            return jnp.moveaxis(a.reshape(B, n_chunks, T // n_chunks, *a.shape[2:]), 1, 0)

        zero_w = jnp.zeros(w.shape, jnp.float32) if grad_w else None

        def body(carry, xs):
            (loss, count, correct), dw_sum = carry
            (l, c, k), dh, dw = chunk(xs[0], w, xs[1], xs[2])
            dw_sum = None if dw is None else dw_sum + dw
            return ((loss + l, count + c, correct + k), dw_sum), dh

        zeros = (jnp.zeros((), jnp.float32),) * 3
        (sums, dw), dh = jax.lax.scan(body, (zeros, zero_w),
                                      (split(h), split(targets), split(valid)))
        if dh is not None:
            dh = jnp.moveaxis(dh, 0, 1).reshape(B, T, E)
        return sums, dh, dw

    @jax.custom_vjp
    def ce(h, w, targets, valid):
        return run(h, w, targets, valid, False, False)[0]

    def fwd(h, w, targets, valid):
        sums, dh, dw = run(h.value, w.value, targets.value, valid.value, h.perturbed,
                           w.perturbed)
        return sums, (dh, None if dw is None else dw.astype(w.value.dtype))

    def bwd(res, cts):
        dh, dw = res
        g = cts[0]
        if isinstance(g, SymbolicZero):
            return None, None, None, None
        return (None if dh is None else dh * g.astype(dh.dtype),
                None if dw is None else dw * g.astype(dw.dtype), None, None)

    ce.defvjp(fwd, bwd, symbolic_zeros=True)
    return ce


def output_head(model):
    """The :class:`peftjax.models.OutputHead` of a causal LM (or of the model a PeftModel
    wraps), or None when its logits are not a plain linear map of the hidden states."""
    base = getattr(model, "base_model", model)
    get = getattr(base, "output_head", None)
    return get() if get is not None else None


def model_loss_sums(model, batch: dict, *, task: str, dropout_rng=None):
    """``(loss_sum, n_targets, n_correct)`` of ``model`` on ``batch`` (``input_ids``,
    ``attention_mask``, ``labels``, other model inputs) for ``task``; a causal LM with a plain
    linear head goes through :func:`lm_head_loss` (no full logits)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if dropout_rng is not None:
        inputs["dropout_rng"] = dropout_rng
    head = output_head(model) if task == "causal_lm" else None
    if head is not None:
        out = model(**inputs, compute_logits=False)
        return lm_head_loss(out.hidden_states, head, batch["labels"], batch.get("attention_mask"))
    out = model(**inputs)
    return LOSSES[task](out.logits, batch["labels"], batch.get("attention_mask"))


def token_classification_loss(logits_BTC, labels_BT, attention_mask_BT=None):
    valid = labels_BT != IGNORE_INDEX
    if attention_mask_BT is not None:
        valid = valid & (attention_mask_BT != 0)
    return _token_ce(logits_BTC, labels_BT, valid)


def sequence_classification_loss(logits_BC, labels_B, attention_mask_BT=None):
    """Cross entropy over classes; with one output (``num_labels=1``) mean squared error on
    float labels, as transformers' regression (``n_correct`` is then 0)."""
    del attention_mask_BT
    if logits_BC.shape[-1] == 1:
        err = logits_BC[:, 0].astype(jnp.float32) - labels_B.astype(jnp.float32)
        return jnp.sum(err * err), jnp.float32(labels_B.shape[0]), jnp.float32(0.0)
    return _token_ce(logits_BC, labels_B.astype(jnp.int32), labels_B != IGNORE_INDEX)


LOSSES = {
    "causal_lm": causal_lm_loss,
    "sequence_classification": sequence_classification_loss,
    "token_classification": token_classification_loss,
}
