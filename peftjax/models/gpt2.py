"""GPT-2 with Hugging Face module names (``transformer.h.N.attn.c_attn``...).

GPT-2's projections are ``Conv1D`` layers whose HF weights are stored [in, out]; ``c_attn``
computes q, k and v in one matmul (PEFT targets it as one module with ``fan_in_fan_out``).
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
from peftjax.models._heads import CausalLM, SequenceClassifier, TokenClassifier

MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    model_type: str
    vocab_size: int
    n_positions: int
    hidden_size: int
    num_layers: int
    num_heads: int
    inner_size: int
    activation: str
    norm_eps: float
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    num_labels: int = 2
    classifier_dropout: float = 0.1
    initializer_range: float = 0.02
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads


def parse_config(data: dict, *, num_labels: int | None = None) -> GPT2Config:
    cfg = HFConfig(data, "config.json (model_type='gpt2')")
    E = cfg.require("n_embd")
    cfg.expect("add_cross_attention", False, (False,), "Encoder-decoder GPT-2 is not implemented.")
    for key in ("summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                "summary_first_dropout", "reorder_and_upcast_attn"):
        cfg.get(key)  # double-heads summary settings and a numerics-only switch: not architectural
    return GPT2Config(
        model_type="gpt2",
        vocab_size=cfg.require("vocab_size"),
        n_positions=cfg.require("n_positions"),
        hidden_size=E,
        num_layers=cfg.require("n_layer"),
        num_heads=cfg.require("n_head"),
        inner_size=cfg.get("n_inner") or 4 * E,
        activation=cfg.expect("activation_function", "gelu_new", tuple(L.ACTIVATIONS)),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
        embd_pdrop=float(cfg.get("embd_pdrop", 0.1)),
        attn_pdrop=float(cfg.get("attn_pdrop", 0.1)),
        resid_pdrop=float(cfg.get("resid_pdrop", 0.1)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        pad_token_id=cfg.get("pad_token_id"),
        num_labels=cfg.num_labels(num_labels),
        classifier_dropout=cfg.classifier_dropout(),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        hf_config=cfg.finish(),
    )


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, dtype, param_dtype, rngs):
        # the index only where it changes the program (train.scan_layers scans identical graphs)
        self.cfg = cfg
        self.layer_idx = layer_idx if cfg.scale_attn_by_inverse_layer_idx else None
        E = cfg.hidden_size
        kw = L.init_kw(cfg, dtype, param_dtype, rngs)
        self.c_attn = L.Conv1D(E, 3 * E, use_bias=True, axes=("embed", "qkv"), **kw)
        self.c_proj = L.Conv1D(E, E, use_bias=True, axes=("heads", "embed"), **kw)

    def __call__(self, x_BTE, *, mask_BTS, cache_kv=None, cache_index=None, extra=None,
                 dropout_rng=None):
        cfg = self.cfg
        B, T, E = x_BTE.shape
        H, D = cfg.num_heads, cfg.head_dim
        q, k, v = jnp.split(checkpoint_name(self.c_attn(x_BTE), "qkv"), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, D) for a in (q, k, v))
        new_cache = None
        if cache_kv is not None:
            k, v = new_cache = L.update_cache(*cache_kv, k, v, cache_index)
        scale = (D ** -0.5 if cfg.scale_attn_weights else 1.0)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        gated = extra is not None and extra.gate is not None
        if extra is not None:
            extra = extra.projected(self.project_kv)
        out = A.dot_product_attention(q, k, v, mask_BTS, scale=scale,
                                      extra=None if gated else extra,
                                      dropout_rate=cfg.attn_pdrop, dropout_rng=L.fold(dropout_rng, 0),
                                      causal=cache_kv is None)
        out = L.dropout(self.c_proj(out.reshape(B, T, E)), cfg.resid_pdrop, L.fold(dropout_rng, 1))
        if gated:  # LLaMA-Adapter on GPT-2, as PEFT: the gated term joins after c_proj, unprojected
            out = out + A.gated_attention(q, extra, scale=scale).reshape(B, T, E)
        return out, new_cache

    def project_kv(self, x_BPE):
        """Keys and values of hidden states ``x`` (LLaMA-Adapter's prompt through c_attn)."""
        B, P, E = x_BPE.shape
        _, k, v = jnp.split(self.c_attn(x_BPE), 3, axis=-1)
        return (k.reshape(B, P, self.cfg.num_heads, self.cfg.head_dim),
                v.reshape(B, P, self.cfg.num_heads, self.cfg.head_dim))


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs):
        kw = L.init_kw(cfg, dtype, param_dtype, rngs)
        self.act, self.rate = cfg.activation, cfg.resid_pdrop
        self.c_fc = L.Conv1D(cfg.hidden_size, cfg.inner_size, use_bias=True, axes=("embed", "mlp"), **kw)
        self.c_proj = L.Conv1D(cfg.inner_size, cfg.hidden_size, use_bias=True, axes=("mlp", "embed"), **kw)

    def __call__(self, x, dropout_rng=None):
        h = checkpoint_name(L.ACTIVATIONS[self.act](self.c_fc(x)), "mlp_hidden")
        return L.dropout(self.c_proj(h), self.rate, dropout_rng)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, dtype, param_dtype, rngs):
        ln = lambda: L.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype,  # noqa: E731
                                 param_dtype=param_dtype)
        self.ln_1 = ln()
        self.attn = GPT2Attention(cfg, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_2 = ln()
        self.mlp = GPT2MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, *, dropout_rng=None, **attn_kw):
        h, new_cache = self.attn(self.ln_1(x), dropout_rng=L.fold(dropout_rng, 0), **attn_kw)
        x = L.join_residual(self, "attention_adapters", h, x)
        h = self.mlp(self.ln_2(x), L.fold(dropout_rng, 1))
        return L.join_residual(self, "output_adapters", h, x), new_cache


class GPT2Model(nnx.Module):
    """HF ``GPT2Model``: token + learned position embeddings, pre-norm blocks, final LayerNorm."""

    new_head_params = ()

    def __init__(self, cfg: GPT2Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        kw = L.init_kw(cfg, dtype, param_dtype, rngs)
        self.wte = L.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.wpe = L.Embed(cfg.n_positions, cfg.hidden_size, axes=("positions", "embed"), **kw)
        self.h = nnx.List([GPT2Block(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                           for i in range(cfg.num_layers)])
        self.ln_f = L.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype,
                                param_dtype=param_dtype)
        self.remat = "none"  # per-block rematerialisation policy (peftjax.train.set_remat)
        self.scan_layers = False  # identical blocks as one scan (peftjax.train.set_scan_layers)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 cache: L.KVCache | None = None, extra_kv=None, dropout_rng=None) -> L.ModelOutput:
        """Same contract as :meth:`DecoderModel.__call__`; ``dropout_rng`` enables dropout."""
        cfg = self.config
        x = L.embed_inputs(input_ids, inputs_embeds, self.wte, self.dtype)
        B, T, _ = x.shape
        attention_mask, offset, q_slots = L.causal_slots(B, T, attention_mask, cache)
        if positions is None:
            positions = L.default_positions(attention_mask, T, offset)
        x = L.dropout(x + self.wpe(positions), cfg.embd_pdrop, L.fold(dropout_rng, -1))
        mask = A.attention_mask(q_slots, attention_mask, causal=True, window=None)
        per_layer = [dict(cache_kv=cache.layer(i) if cache is not None else None,
                          extra=extra_kv[i] if extra_kv is not None else None,
                          dropout_rng=L.fold(dropout_rng, i)) for i in range(len(self.h))]
        x, kvs = L.run_blocks(self.h, self.remat,
                              self.scan_layers and (cache is None or T > 1), x, per_layer,
                              mask_BTS=mask, cache_index=offset)
        return L.ModelOutput(hidden_states=self.ln_f(x), cache=L.next_cache(cache, kvs, T))

    @property
    def input_embeddings(self) -> L.Embed:
        return self.wte

    def init_cache(self, batch: int, max_len: int, dtype=None) -> L.KVCache:
        cfg = self.config
        return L.KVCache.create(num_layers=cfg.num_layers, batch=batch, max_len=max_len,
                                kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                dtype=dtype or self.dtype)


class GPT2LMHeadModel(CausalLM):
    base_model_prefix = "transformer"
    backbone_cls = GPT2Model


class GPT2ForSequenceClassification(SequenceClassifier):
    base_model_prefix = "transformer"
    backbone_cls = GPT2Model


class GPT2ForTokenClassification(TokenClassifier):
    base_model_prefix = "transformer"
    backbone_cls = GPT2Model
    head_name = "classifier"
    new_head_params = ("classifier",)


TASKS = {
    "causal_lm": GPT2LMHeadModel,
    "sequence_classification": GPT2ForSequenceClassification,
    "token_classification": GPT2ForTokenClassification,
    "features": GPT2Model,
}
