"""BERT and RoBERTa encoders (MiniLM checkpoints are BERT) with Hugging Face module names.

Module paths match transformers (``encoder.layer.N.attention.self.query``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``...) so PEFT's default
targets for BERT (``query``, ``value``) select the same layers here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from peftjax.models import _attention as A
from peftjax.models import _layers as L
from peftjax.models._config import HFConfig
from peftjax.models._heads import TaskModel, TokenClassifier

MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    activation: str
    norm_eps: float
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float = 0.1
    pad_token_id: int = 0
    num_labels: int = 2
    initializer_range: float = 0.02
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def parse_config(data: dict, *, num_labels: int | None = None) -> EncoderConfig:
    model_type = data["model_type"]
    cfg = HFConfig(data, f"config.json (model_type={model_type!r})")
    cfg.expect("position_embedding_type", "absolute", ("absolute",),
               "Relative position embeddings are not implemented.")
    cfg.expect("is_decoder", False, (False,), "Only the bidirectional encoder is implemented.")
    cfg.expect("add_cross_attention", False, (False,))
    return EncoderConfig(
        model_type=model_type,
        vocab_size=cfg.require("vocab_size"),
        hidden_size=cfg.require("hidden_size"),
        num_layers=cfg.require("num_hidden_layers"),
        num_heads=cfg.require("num_attention_heads"),
        intermediate_size=cfg.require("intermediate_size"),
        max_position_embeddings=cfg.require("max_position_embeddings"),
        type_vocab_size=cfg.get("type_vocab_size", 2),
        activation=cfg.expect("hidden_act", "gelu", tuple(L.ACTIVATIONS)),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        hidden_dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
        classifier_dropout=cfg.classifier_dropout("hidden_dropout_prob"),
        pad_token_id=cfg.get("pad_token_id", 1 if model_type == "roberta" else 0),
        num_labels=cfg.num_labels(num_labels),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        hf_config=cfg.finish(),
    )


class _Module(nnx.Module):
    """An empty container, so that paths read like transformers' (``attention.output``...)."""


def _dense_ln(cfg, in_features, *, dtype, param_dtype, rngs) -> _Module:
    m = _Module()
    m.dense = L.Linear(in_features, cfg.hidden_size, use_bias=True,
                       axes=("mlp" if in_features != cfg.hidden_size else "heads", "embed"),
                       **L.init_kw(cfg, dtype, param_dtype, rngs))
    m.LayerNorm = L.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
    return m


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs):
        kw = L.init_kw(cfg, dtype, param_dtype, rngs)
        self.word_embeddings = L.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.position_embeddings = L.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                           axes=("positions", "embed"), **kw)
        self.token_type_embeddings = L.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                             axes=("types", "embed"), **kw)
        self.LayerNorm = L.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype,
                                     param_dtype=param_dtype)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs):
        kw = L.init_kw(cfg, dtype, param_dtype, rngs)
        E = cfg.hidden_size
        self.query = L.Linear(E, E, use_bias=True, axes=("embed", "heads"), **kw)
        self.key = L.Linear(E, E, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.value = L.Linear(E, E, use_bias=True, axes=("embed", "kv_heads"), **kw)


class BertLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, param_dtype, rngs):
        self.cfg = cfg
        self.attention = _Module()
        self.attention.self = BertSelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention.output = _dense_ln(cfg, cfg.hidden_size, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
        self.intermediate = _Module()
        self.intermediate.dense = L.Linear(cfg.hidden_size, cfg.intermediate_size, use_bias=True,
                                           axes=("embed", "mlp"), **L.init_kw(cfg, dtype, param_dtype, rngs))
        self.output = _dense_ln(cfg, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

    def __call__(self, x_BTE, *, mask_BTS, extra=None, dropout_rng=None):
        cfg = self.cfg
        B, T, E = x_BTE.shape
        H, D = cfg.num_heads, cfg.head_dim
        sa = self.attention.self
        q, k, v = (checkpoint_name(m(x_BTE), "qkv").reshape(B, T, H, D)
                   for m in (sa.query, sa.key, sa.value))
        if extra is not None:
            extra = extra.projected(lambda p: tuple(
                m(p).reshape(p.shape[0], p.shape[1], H, D) for m in (sa.key, sa.value)))
        a = A.dot_product_attention(q, k, v, mask_BTS, scale=D ** -0.5, extra=extra,
                                    dropout_rate=cfg.attention_dropout,
                                    dropout_rng=L.fold(dropout_rng, 0)).reshape(B, T, E)
        ao = self.attention.output
        x = L.join_residual(self, "attention_adapters",
                            L.dropout(ao.dense(a), cfg.hidden_dropout, L.fold(dropout_rng, 1)),
                            x_BTE, ao.LayerNorm)
        h = checkpoint_name(L.ACTIVATIONS[cfg.activation](self.intermediate.dense(x)), "mlp_hidden")
        o = self.output
        return L.join_residual(self, "output_adapters",
                               L.dropout(o.dense(h), cfg.hidden_dropout, L.fold(dropout_rng, 2)),
                               x, o.LayerNorm)


class BertModel(nnx.Module):
    """HF ``BertModel`` / ``RobertaModel``: embeddings, encoder, optional pooler (dense + tanh
    on the first token). Returns ``hidden_states`` [B, T, E] and ``pooled`` [B, E]."""

    new_head_params = ("pooler",)

    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, add_pooling_layer: bool = True):
        self.config, self.dtype = cfg, dtype
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = _Module()
        self.encoder.layer = nnx.List([BertLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                       for _ in range(cfg.num_layers)])
        pooler = None
        if add_pooling_layer:
            pooler = _Module()
            pooler.dense = L.Linear(cfg.hidden_size, cfg.hidden_size, use_bias=True,
                                    axes=("embed", "embed_out"), **L.init_kw(cfg, dtype, param_dtype, rngs))
        self.pooler = pooler
        self.remat = "none"  # per-block rematerialisation policy (peftjax.train.set_remat)
        self.scan_layers = False  # identical blocks as one scan (peftjax.train.set_scan_layers)

    def default_positions(self, input_ids, attention_mask, B: int, T: int):
        """Absolute position ids that count real tokens, so that left and right padding give
        the same embeddings (equal to transformers' on right-padded input; RoBERTa's start
        after its padding index, as transformers derives them from the padding tokens)."""
        cfg = self.config
        offset = cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0
        if attention_mask is None and cfg.model_type == "roberta" and input_ids is not None:
            attention_mask = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        if attention_mask is None:
            return jnp.broadcast_to(jnp.arange(offset, offset + T, dtype=jnp.int32), (B, T))
        real = attention_mask.astype(jnp.int32)
        if cfg.model_type == "roberta":  # padding slots get the padding index, as transformers
            return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
        return L.default_positions(real, T, 0)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 token_type_ids=None, extra_kv=None, dropout_rng=None, cache=None) -> L.ModelOutput:
        """Encodes ``input_ids`` [B, T] (or ``inputs_embeds``); ``attention_mask`` [B, T] marks
        real tokens. ``dropout_rng`` turns on the config's dropout (training)."""
        if cache is not None:
            raise ValueError("encoders take no KV cache")
        cfg, emb = self.config, self.embeddings
        x = L.embed_inputs(input_ids, inputs_embeds, emb.word_embeddings, self.dtype)
        B, T, _ = x.shape
        if positions is None:
            positions = self.default_positions(input_ids, attention_mask, B, T)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, T), jnp.int32)
        x = x + emb.token_type_embeddings(token_type_ids) + emb.position_embeddings(positions)
        x = L.dropout(emb.LayerNorm(x), cfg.hidden_dropout, L.fold(dropout_rng, -1))
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        mask = A.attention_mask(jnp.zeros((1, T), jnp.int32), attention_mask, causal=False,
                                window=None)
        per_layer = [dict(extra=extra_kv[i] if extra_kv is not None else None,
                          dropout_rng=L.fold(dropout_rng, i))
                     for i in range(len(self.encoder.layer))]
        x, _ = L.run_blocks(self.encoder.layer, self.remat, self.scan_layers, x, per_layer,
                            mask_BTS=mask)
        pooled = (jnp.tanh(self.pooler.dense(L.first_token(x, attention_mask)))
                  if self.pooler is not None else None)
        return L.ModelOutput(hidden_states=x, pooled=pooled)

    @property
    def input_embeddings(self) -> L.Embed:
        return self.embeddings.word_embeddings


class _EncoderTask(TaskModel):
    """BERT checkpoints keep the encoder under ``bert``, RoBERTa under ``roberta``."""

    base_model_prefix = "bert"
    backbone_cls = BertModel

    @classmethod
    def prefix_for(cls, cfg) -> str:
        return cfg.model_type

    def backbone_kwargs(self, cfg) -> dict:
        return {"add_pooling_layer": self.uses_pooler(cfg)}

    def uses_pooler(self, cfg) -> bool:
        return False


class BertForSequenceClassification(_EncoderTask):
    """BERT: pooler output -> dropout -> ``classifier``. RoBERTa: first token ->
    ``classifier.dense`` + tanh -> ``classifier.out_proj`` (no pooler), as in transformers."""

    new_head_params = ("classifier",)

    def uses_pooler(self, cfg) -> bool:
        return cfg.model_type != "roberta"

    def init_head(self, cfg, kw):
        E, N = cfg.hidden_size, cfg.num_labels
        if cfg.model_type == "roberta":
            head = _Module()
            head.dense = L.Linear(E, E, use_bias=True, axes=("embed", "embed_out"), **kw)
            head.out_proj = L.Linear(E, N, use_bias=True, axes=("embed", "labels"), **kw)
            self.classifier = head
        else:
            self.classifier = L.Linear(E, N, use_bias=True, axes=("embed", "labels"), **kw)

    def __call__(self, input_ids=None, *, dropout_rng=None, **kw) -> L.ModelOutput:
        out = self.backbone(input_ids, dropout_rng=dropout_rng, **kw)
        r = self.config.classifier_dropout
        if isinstance(self.classifier, L.Linear):
            logits = self.classifier(L.dropout(out.pooled, r, L.fold(dropout_rng, -2)))
        else:
            h = L.first_token(out.hidden_states, kw.get("attention_mask"))
            h = L.dropout(h, r, L.fold(dropout_rng, -2))
            h = jnp.tanh(self.classifier.dense(h))
            logits = self.classifier.out_proj(L.dropout(h, r, L.fold(dropout_rng, -3)))
        return out.replace(logits=logits)


class BertForTokenClassification(_EncoderTask, TokenClassifier):
    head_name = "classifier"
    new_head_params = ("classifier",)


TASKS = {
    "sequence_classification": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "features": BertModel,
}
