"""The decoder-only transformer shared by the Llama and Gemma families.

Llama 2/3, Mistral, Qwen2, Qwen3 and Gemma 1/2/3 differ only in switches held by
:class:`DecoderConfig` (biases, q/k norms, norm offset, sandwich norms, embedding scale,
soft-capping, per-layer sliding windows and rotary tables). Submodule names are Hugging Face's
(``model.layers.N.self_attn.q_proj``...), so PEFT ``target_modules`` lists mean the same here.
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


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    activation: str
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False      # Gemma 2/3: extra norms after attention and around the MLP
    norm_offset: float = 0.0         # Gemma: weights stored as (scale - 1)
    embed_scale: float | None = None  # Gemma: embeddings multiplied by sqrt(hidden_size)
    attn_scale: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_windows: tuple[int | None, ...] = ()  # sliding window per layer, None for global
    layer_ropes: tuple[L.Rope, ...] = ()        # rotary table per layer
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    num_labels: int = 2
    classifier_dropout: float = 0.1
    initializer_range: float = 0.02
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def common_fields(cfg: HFConfig, num_labels: int | None) -> dict:
    """The DecoderConfig fields every decoder family reads the same way."""
    E, H = cfg.require("hidden_size"), cfg.require("num_attention_heads")
    return dict(
        vocab_size=cfg.require("vocab_size"),
        hidden_size=E,
        intermediate_size=cfg.require("intermediate_size"),
        num_layers=cfg.require("num_hidden_layers"),
        num_heads=H,
        num_kv_heads=cfg.get("num_key_value_heads", H),
        head_dim=cfg.get("head_dim", E // H),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        pad_token_id=cfg.get("pad_token_id"),
        num_labels=cfg.num_labels(num_labels),
        classifier_dropout=cfg.classifier_dropout(),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )


class DecoderAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, dtype, param_dtype, rngs):
        # the layer's rotary table, not its index: identical layers have identical graphs, which
        # is what lets train.scan_layers scan them
        self.cfg, self.rope = cfg, cfg.layer_ropes[layer_idx]
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = L.init_kw(cfg, dtype, param_dtype, rngs)
        self.q_proj = L.Linear(E, H * D, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
        self.k_proj = L.Linear(E, K * D, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
        self.v_proj = L.Linear(E, K * D, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
        self.o_proj = L.Linear(H * D, E, use_bias=cfg.o_bias, axes=("heads", "embed"), **kw)
        if cfg.qk_norm:
            norm = dict(eps=cfg.norm_eps, offset=cfg.norm_offset, axes=("head_dim",), dtype=dtype,
                        param_dtype=param_dtype)
            self.q_norm = L.RMSNorm(D, **norm)
            self.k_norm = L.RMSNorm(D, **norm)

    def __call__(self, x_BTE, *, positions_BT, mask_BTS, window=None, cache_kv=None,
                 cache_index=None, extra: A.ExtraKV | None = None):
        cfg = self.cfg
        B, T, _ = x_BTE.shape
        q = self.q_proj(x_BTE).reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_BTE).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_BTE).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        q, k, v = (checkpoint_name(a, "qkv") for a in (q, k, v))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = L.apply_rope(q, positions_BT, self.rope), L.apply_rope(k, positions_BT, self.rope)
        new_cache = None
        if cache_kv is not None:
            k, v = new_cache = L.update_cache(*cache_kv, k, v, cache_index)
        if extra is not None:
            extra = extra.projected(self.project_kv)
        out = A.dot_product_attention(q, k, v, mask_BTS, scale=cfg.attn_scale,
                                      softcap=cfg.attn_softcap, extra=extra,
                                      causal=cache_kv is None, window=window)
        return self.o_proj(out.reshape(B, T, -1)), new_cache

    def project_kv(self, x_BPE):
        """Keys and values of hidden states ``x`` without rotary embedding (LLaMA-Adapter's
        prompt through the frozen projections)."""
        cfg = self.cfg
        B, P, _ = x_BPE.shape
        k = self.k_proj(x_BPE).reshape(B, P, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_BPE).reshape(B, P, cfg.num_kv_heads, cfg.head_dim)
        return (self.k_norm(k) if cfg.qk_norm else k), v


class DecoderMLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs):
        E, F = cfg.hidden_size, cfg.intermediate_size
        kw = L.init_kw(cfg, dtype, param_dtype, rngs)
        self.act = cfg.activation
        self.gate_proj = L.Linear(E, F, use_bias=cfg.mlp_bias, axes=("embed", "mlp"), **kw)
        self.up_proj = L.Linear(E, F, use_bias=cfg.mlp_bias, axes=("embed", "mlp"), **kw)
        self.down_proj = L.Linear(F, E, use_bias=cfg.mlp_bias, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        h = L.ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(checkpoint_name(h, "mlp_hidden"))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, dtype, param_dtype, rngs):
        self.sandwich = cfg.sandwich_norm
        norm = lambda: L.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, offset=cfg.norm_offset,  # noqa: E731
                                 dtype=dtype, param_dtype=param_dtype)
        self.self_attn = DecoderAttention(cfg, layer_idx, dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)
        self.mlp = DecoderMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(self, x, **attn_kw):
        h, new_cache = self.self_attn(self.input_layernorm(x), **attn_kw)
        if self.sandwich:
            x = L.join_residual(self, "attention_adapters", self.post_attention_layernorm(h), x)
            h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return L.join_residual(self, "output_adapters", h, x), new_cache
        x = L.join_residual(self, "attention_adapters", h, x)
        return L.join_residual(self, "output_adapters",
                               self.mlp(self.post_attention_layernorm(x)), x), new_cache


class DecoderModel(nnx.Module):
    """The decoder stack (HF ``LlamaModel``/``GemmaModel``...): returns final hidden states."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        self.embed_tokens = L.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                                    **L.init_kw(cfg, dtype, param_dtype, rngs))
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.norm = L.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, offset=cfg.norm_offset,
                              dtype=dtype, param_dtype=param_dtype)
        self.remat = "none"  # per-block rematerialisation policy (peftjax.train.set_remat)
        self.scan_layers = False  # identical blocks as one scan (peftjax.train.set_scan_layers)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 cache: L.KVCache | None = None, extra_kv=None, dropout_rng=None) -> L.ModelOutput:
        """Runs the stack on ``input_ids`` [B, T] or ``inputs_embeds`` [B, T, E].

        ``attention_mask`` [B, S] marks real tokens (1) and padding (0) over every key slot:
        S = T without a cache, S = cache length with one. ``positions`` [B, T] default to the
        count of real tokens before each slot, so left padding needs no special care.
        ``extra_kv`` is a per-layer sequence of :class:`ExtraKV` (or None entries).
        """
        del dropout_rng  # these families train without dropout (attention_dropout is 0)
        cfg = self.config
        x = L.embed_inputs(input_ids, inputs_embeds, self.embed_tokens, self.dtype)
        if inputs_embeds is None and cfg.embed_scale is not None:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)  # Gemma: ids' embeddings only, as HF
        B, T, _ = x.shape
        attention_mask, offset, q_slots = L.causal_slots(B, T, attention_mask, cache)
        if positions is None:
            positions = L.default_positions(attention_mask, T, offset)
        masks = {w: A.attention_mask(q_slots, attention_mask, causal=True, window=w)
                 for w in set(cfg.layer_windows)}
        per_layer = [dict(mask_BTS=masks[cfg.layer_windows[i]], window=cfg.layer_windows[i],
                          cache_kv=cache.layer(i) if cache is not None else None,
                          extra=extra_kv[i] if extra_kv is not None else None)
                     for i in range(len(self.layers))]
        x, kvs = L.run_blocks(self.layers, self.remat,
                              self.scan_layers and (cache is None or T > 1), x, per_layer,
                              positions_BT=positions, cache_index=offset)
        return L.ModelOutput(hidden_states=self.norm(x), cache=L.next_cache(cache, kvs, T))

    @property
    def input_embeddings(self) -> L.Embed:
        return self.embed_tokens

    def init_cache(self, batch: int, max_len: int, dtype=None) -> L.KVCache:
        cfg = self.config
        return L.KVCache.create(num_layers=cfg.num_layers, batch=batch, max_len=max_len,
                                kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                dtype=dtype or self.dtype)


class DecoderForCausalLM(CausalLM):
    backbone_cls = DecoderModel


class DecoderForSequenceClassification(SequenceClassifier):
    backbone_cls = DecoderModel


class DecoderForTokenClassification(TokenClassifier):
    backbone_cls = DecoderModel


TASKS = {
    "causal_lm": DecoderForCausalLM,
    "sequence_classification": DecoderForSequenceClassification,
    "token_classification": DecoderForTokenClassification,
    "features": DecoderModel,
}
