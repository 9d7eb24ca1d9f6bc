"""The decoder-only transformer shared by the Llama and Gemma families.

Llama 2/3, Mistral, Qwen2, Qwen3 and Gemma 1/2/3 differ only in switches held by
:class:`DecoderConfig` (biases, q/k norms, norm offset, sandwich norms, embedding scale,
soft-capping, per-layer sliding windows and rotary tables). Submodule names are Hugging Face's
(``model.layers.N.self_attn.q_proj``...), so PEFT ``target_modules`` lists mean the same here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _layers as L


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
    initializer_range: float = 0.02
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def _kw(cfg: DecoderConfig, dtype, param_dtype, rngs):
    return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)


class DecoderAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, *, dtype, param_dtype, rngs):
        self.cfg, self.layer_idx = cfg, layer_idx
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = _kw(cfg, dtype, param_dtype, rngs)
        self.q_proj = L.Linear(E, H * D, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
        self.k_proj = L.Linear(E, K * D, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
        self.v_proj = L.Linear(E, K * D, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
        self.o_proj = L.Linear(H * D, E, use_bias=cfg.o_bias, axes=("heads", "embed"), **kw)
        if cfg.qk_norm:
            norm = dict(eps=cfg.norm_eps, offset=cfg.norm_offset, axes=("head_dim",), dtype=dtype,
                        param_dtype=param_dtype)
            self.q_norm = L.RMSNorm(D, **norm)
            self.k_norm = L.RMSNorm(D, **norm)

    def __call__(self, x_BTE, *, positions_BT, mask_BTS, cache_kv=None, cache_index=None,
                 extra: L.ExtraKV | None = None):
        cfg = self.cfg
        B, T, _ = x_BTE.shape
        q = self.q_proj(x_BTE).reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_BTE).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_BTE).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = cfg.layer_ropes[self.layer_idx]
        q, k = L.apply_rope(q, positions_BT, rope), L.apply_rope(k, positions_BT, rope)
        new_cache = None
        if cache_kv is not None:
            k, v = new_cache = L.update_cache(*cache_kv, k, v, cache_index)
        out = L.dot_product_attention(q, k, v, mask_BTS, scale=cfg.attn_scale,
                                      softcap=cfg.attn_softcap, extra=extra)
        return self.o_proj(out.reshape(B, T, -1)), new_cache


class DecoderMLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs):
        E, F = cfg.hidden_size, cfg.intermediate_size
        kw = _kw(cfg, dtype, param_dtype, rngs)
        self.act = cfg.activation
        self.gate_proj = L.Linear(E, F, use_bias=cfg.mlp_bias, axes=("embed", "mlp"), **kw)
        self.up_proj = L.Linear(E, F, use_bias=cfg.mlp_bias, axes=("embed", "mlp"), **kw)
        self.down_proj = L.Linear(F, E, use_bias=cfg.mlp_bias, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(L.ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


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
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), new_cache
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


def default_positions(attention_mask_BS, T: int, offset) -> jax.Array:
    """Position ids of the T current tokens: count of real tokens before each slot."""
    pos_BS = jnp.cumsum(attention_mask_BS.astype(jnp.int32), axis=-1) - 1
    pos_BT = jax.lax.dynamic_slice_in_dim(pos_BS, offset, T, axis=1)
    return jnp.maximum(pos_BT, 0)


class DecoderModel(nnx.Module):
    """The decoder stack (HF ``LlamaModel``/``GemmaModel``...): returns final hidden states."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        self.embed_tokens = L.Embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"),
                                    **_kw(cfg, dtype, param_dtype, rngs))
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.norm = L.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, offset=cfg.norm_offset,
                              dtype=dtype, param_dtype=param_dtype)

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
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids)
            if cfg.embed_scale is not None:  # Gemma scales token embeddings, not inputs_embeds
                x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        else:
            x = inputs_embeds.astype(self.dtype)
        B, T, _ = x.shape
        offset = cache.index if cache is not None else 0
        S = cache.max_len if cache is not None else T
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.int32)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {(B, S)} "
                             f"({'the cache length' if cache is not None else 'the input length'}).")
        if positions is None:
            positions = default_positions(attention_mask, T, offset)
        q_slots = (jnp.arange(T, dtype=jnp.int32) + offset)[None, :]
        masks = {w: L.attention_mask(q_slots, attention_mask, causal=True, window=w)
                 for w in set(cfg.layer_windows)}
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            cache_kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x, kv = layer(x, positions_BT=positions, mask_BTS=masks[cfg.layer_windows[i]],
                          cache_kv=cache_kv, cache_index=offset,
                          extra=extra_kv[i] if extra_kv is not None else None)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        new_cache = (L.KVCache(tuple(new_k), tuple(new_v), cache.index + T)
                     if cache is not None else None)
        return L.ModelOutput(hidden_states=self.norm(x), cache=new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> L.KVCache:
        cfg = self.config
        return L.KVCache.create(num_layers=cfg.num_layers, batch=batch, max_len=max_len,
                                kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                dtype=dtype or self.dtype)


class _DecoderTask(nnx.Module):
    base_model_prefix = "model"

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        self.model = DecoderModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> L.KVCache:
        return self.model.init_cache(batch, max_len, dtype)


class DecoderForCausalLM(_DecoderTask):
    new_head_params = ()

    def __init__(self, cfg, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        L.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                 axes=("embed", "vocab"), **_kw(cfg, dtype, param_dtype, rngs)))

    def __call__(self, input_ids=None, *, last_logits_only: bool = False, **kw) -> L.ModelOutput:
        """Logits [B, T, vocab]; ``last_logits_only`` computes them for the last slot only
        (what generation needs: with left padding the last slot is every row's last token)."""
        out = self.model(input_ids, **kw)
        h = out.hidden_states[:, -1:] if last_logits_only else out.hidden_states
        logits = self.model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        if self.config.final_softcap is not None:
            cap = self.config.final_softcap
            logits = jnp.tanh(logits / cap) * cap
        return out.replace(logits=logits)


class DecoderForSequenceClassification(_DecoderTask):
    """Classifies each sequence from its last real token (left or right padding)."""

    new_head_params = ("score",)

    def __init__(self, cfg, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.score = L.Linear(cfg.hidden_size, cfg.num_labels, use_bias=False,
                              axes=("embed", "labels"), **_kw(cfg, dtype, param_dtype, rngs))

    def __call__(self, input_ids=None, *, attention_mask=None, **kw) -> L.ModelOutput:
        out = self.model(input_ids, attention_mask=attention_mask, **kw)
        h = out.hidden_states
        idx = L.last_token_index(attention_mask, h.shape[1], h.shape[0])
        return out.replace(logits=self.score(h[jnp.arange(h.shape[0]), idx]))


class DecoderForTokenClassification(_DecoderTask):
    new_head_params = ("score",)

    def __init__(self, cfg, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.score = L.Linear(cfg.hidden_size, cfg.num_labels, use_bias=True,
                              axes=("embed", "labels"), **_kw(cfg, dtype, param_dtype, rngs))

    def __call__(self, input_ids=None, **kw) -> L.ModelOutput:
        out = self.model(input_ids, **kw)
        return out.replace(logits=self.score(out.hidden_states))


TASKS = {
    "causal_lm": DecoderForCausalLM,
    "sequence_classification": DecoderForSequenceClassification,
    "token_classification": DecoderForTokenClassification,
    "features": DecoderModel,
}
