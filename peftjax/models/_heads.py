"""Task models: a backbone under its Hugging Face attribute name plus a task head.

Every family's ``...ForCausalLM`` / ``...ForSequenceClassification`` /
``...ForTokenClassification`` is one of these with ``backbone_cls`` and, where HF names
differ, ``base_model_prefix`` / ``head_name`` set. A backbone provides ``input_embeddings``
(the token embedding table, also the tied output head) and ``init_cache``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _layers as L


class TaskModel(nnx.Module):
    base_model_prefix = "model"
    backbone_cls: type = None  # type: ignore[assignment]
    new_head_params: tuple[str, ...] = ()  # heads initialised fresh when a checkpoint lacks them

    def __init__(self, cfg, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        prefix = self.prefix_for(cfg)
        if prefix != type(self).base_model_prefix:
            self.base_model_prefix = prefix
        setattr(self, prefix, self.backbone_cls(cfg, dtype=dtype, param_dtype=param_dtype,
                                                rngs=rngs, **self.backbone_kwargs(cfg)))
        self.init_head(cfg, L.init_kw(cfg, dtype, param_dtype, rngs))

    @classmethod
    def prefix_for(cls, cfg) -> str:
        return cls.base_model_prefix

    def backbone_kwargs(self, cfg) -> dict:
        return {}

    def init_head(self, cfg, kw: dict) -> None:
        raise NotImplementedError

    @property
    def backbone(self):
        return getattr(self, self.base_model_prefix)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> L.KVCache:
        return self.backbone.init_cache(batch, max_len, dtype)


class CausalLM(TaskModel):
    """Next-token logits; ``lm_head`` is absent when tied to the input embeddings."""

    def init_head(self, cfg, kw):
        self.lm_head = (None if cfg.tie_word_embeddings else
                        L.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                 axes=("embed", "vocab"), **kw))

    def __call__(self, input_ids=None, *, last_logits_only: bool = False,
                 compute_logits: bool = True, **kw) -> L.ModelOutput:
        """Logits [B, T, vocab]; ``last_logits_only`` computes them for the last slot only
        (what generation needs: with left padding the last slot is every row's last token);
        ``compute_logits=False`` returns the final hidden states alone (the train step then
        computes the loss from them through :meth:`output_head`, chunk by chunk)."""
        out = self.backbone(input_ids, **kw)
        if not compute_logits:
            return out
        h = out.hidden_states[:, -1:] if last_logits_only else out.hidden_states
        logits = (self.backbone.input_embeddings.attend(h) if self.lm_head is None
                  else self.lm_head(h))
        cap = getattr(self.config, "final_softcap", None)
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return out.replace(logits=logits)

    def output_head(self) -> L.OutputHead | None:
        """The logits as a plain linear map of the final hidden states (``lm_head``'s kernel, or
        the tied embedding table, and Gemma 2's soft-capping), or None when the head is an
        adapted or 4-bit layer (then only ``__call__`` computes the logits)."""
        cap = getattr(self.config, "final_softcap", None)
        if self.lm_head is None:
            table = self.backbone.input_embeddings
            if type(table) is not L.Embed:
                return None
            return L.OutputHead(table.embedding[...], transposed=True, softcap=cap,
                                dtype=table.dtype)
        if type(self.lm_head) is not L.Linear or self.lm_head.bias is not None:
            return None
        return L.OutputHead(self.lm_head.kernel[...], transposed=False, softcap=cap,
                            dtype=self.lm_head.dtype)


class SequenceClassifier(TaskModel):
    """Classifies each sequence from its last real token (left or right padding), as
    transformers' decoder classifiers do (they locate it through ``pad_token_id``; here the
    attention mask says which tokens are real)."""

    new_head_params = ("score",)

    def init_head(self, cfg, kw):
        self.score = L.Linear(cfg.hidden_size, cfg.num_labels, use_bias=False,
                              axes=("embed", "labels"), **kw)

    def __call__(self, input_ids=None, *, attention_mask=None, **kw) -> L.ModelOutput:
        out = self.backbone(input_ids, attention_mask=attention_mask, **kw)
        h = out.hidden_states
        B, T = h.shape[:2]
        if out.cache is not None and attention_mask is not None:
            # the mask spans the cache's slots (e.g. a prefix written there first): the
            # current tokens are the T slots before the cache's new index
            attention_mask = jax.lax.dynamic_slice_in_dim(attention_mask, out.cache.index - T, T,
                                                          axis=1)
        idx = L.last_token_index(attention_mask, T, B)
        return out.replace(logits=self.score(h[jnp.arange(B), idx]))


class TokenClassifier(TaskModel):
    """Per-token logits [B, T, num_labels] through dropout and a linear ``head_name``."""

    head_name = "score"
    new_head_params = ("score",)

    def init_head(self, cfg, kw):
        setattr(self, self.head_name, L.Linear(cfg.hidden_size, cfg.num_labels, use_bias=True,
                                               axes=("embed", "labels"), **kw))

    def __call__(self, input_ids=None, *, dropout_rng=None, **kw) -> L.ModelOutput:
        out = self.backbone(input_ids, dropout_rng=dropout_rng, **kw)
        h = L.dropout(out.hidden_states, self.config.classifier_dropout, L.fold(dropout_rng, -2))
        return out.replace(logits=getattr(self, self.head_name)(h))
