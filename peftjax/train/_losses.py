"""Losses as sums over targets, so microbatches and devices add up exactly.

Each returns ``(loss_sum, n_targets, n_correct)`` in float32; the mean loss is
``loss_sum / n_targets``. Labels equal to :data:`IGNORE_INDEX` (-100, as in transformers) do
not count: the data pipeline sets them on prompt and padding tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.data._formats import IGNORE_INDEX  # noqa: F401  (labels the data marks ignored)


def _token_ce(logits_NV, labels_N, valid_N):
    logp_NV = jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1)
    safe = jnp.where(valid_N, labels_N, 0)
    nll_N = -jnp.take_along_axis(logp_NV, safe[..., None], axis=-1)[..., 0]
    v = valid_N.astype(jnp.float32)
    correct = (jnp.argmax(logits_NV, axis=-1) == labels_N).astype(jnp.float32) * v
    return jnp.sum(nll_N * v), jnp.sum(v), jnp.sum(correct)


def causal_lm_loss(logits_BTV, labels_BT, attention_mask_BT=None):
    """Next-token cross entropy: position t predicts ``labels[t + 1]`` (labels aligned with the
    inputs, as transformers' ``labels=input_ids``). Padding is ignored through the mask too."""
    labels = labels_BT[:, 1:]
    valid = labels != IGNORE_INDEX
    if attention_mask_BT is not None:
        valid = valid & (attention_mask_BT[:, 1:] != 0)
    return _token_ce(logits_BTV[:, :-1], labels, valid)


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
