"""Prefix tuning (Li & Liang 2021) with PEFT's layout and semantics (``PREFIX_TUNING``).

Every layer gets ``num_virtual_tokens`` learned keys and values in front of its own. As in PEFT
(which passes them as ``past_key_values``):

- the prefix has the layer's key/value geometry: ``num_key_value_heads`` heads under grouped-query
  attention, so PEFT's ``token_dim`` is ``head_dim * num_key_value_heads``; the stored table
  ``prompt_embeddings`` is [num_virtual_tokens, num_layers * 2 * token_dim], each row laid out
  as (layer, key/value, head, head_dim);
- prefix keys are used as stored (not rotated), and the real tokens' positions start after the
  prefix (position ``num_virtual_tokens + i``; here counted over real tokens, so left padding
  gives the same result as right padding);
- ``prefix_projection=True`` trains an embedding plus a two-layer tanh MLP
  (``encoder_hidden_size``) and saves the prefixes it produces, so the file is the plain table
  PEFT saves and loads in inference mode.

Decoders run with the prefix written into the first slots of a KV cache (the same path
generation takes: ``init_cache`` writes it once, decoding never copies it), so sliding-window
layers see it exactly as transformers does. Encoders (BERT/RoBERTa) take it as extra keys of
every layer's softmax. Unlike PEFT, prefix tuning here works with rematerialisation
(``train.remat``): the prefix is an ordinary input of each checkpointed block.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._attention import ExtraKV
from peftjax.tuners._base import AdapterParam, register
from peftjax.tuners._prompt import PromptLearning, call_with_front_cache, split_inputs

PREFIX_INITS = (None, "zero")


class PrefixParam(AdapterParam):
    """Prefix tuning's trained leaves: the prefix table, or the projection's embedding and MLP."""


def geometry(model) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of the model's attention layers."""
    cfg = model.config
    return cfg.num_layers, getattr(cfg, "num_kv_heads", cfg.num_heads), cfg.head_dim


def _uniform(key, shape, fan_in):  # torch.nn.Linear's default initialisation
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class PrefixEncoder(nnx.Module):
    """PEFT's ``PrefixEncoder``: ``embedding`` [V, L*2*token_dim], or with the projection an
    ``embedding`` [V, token_dim] fed through Linear -> tanh -> Linear."""

    def __init__(self, table, transform: tuple | None = None):
        self.embedding = PrefixParam(table, axes=(None, None))
        self.projected = transform is not None
        if transform is not None:
            w_in, b_in, w_out, b_out = transform
            self.w_in, self.b_in = PrefixParam(w_in), PrefixParam(b_in)
            self.w_out, self.b_out = PrefixParam(w_out), PrefixParam(b_out)

    def __call__(self) -> jax.Array:
        """The prefixes [V, L*2*token_dim] (float32)."""
        x = self.embedding[...]
        if not self.projected:
            return x
        h = jnp.tanh(x @ self.w_in[...] + self.b_in[...])
        return h @ self.w_out[...] + self.b_out[...]


@register
@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(PromptLearning):
    """Prefix tuning, with the names, defaults and meaning of PEFT's ``PrefixTuningConfig``.

    ``init_weights=None`` draws the prefix N(0, 1) (``torch.nn.Embedding``); ``"zero"`` starts it
    (or the projection's last layer) at zero. ``token_dim``, ``num_attention_heads``,
    ``num_layers`` and ``encoder_hidden_size`` are filled from the model as PEFT fills them
    (given values must agree with the model).
    """

    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    method = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    merge_reason = "a prefix is extra keys and values in every layer, not a change of any weight."

    def __post_init__(self):
        problems = self.shared_problems()
        if self.init_weights not in PREFIX_INITS:
            problems.append(f"init_weights={self.init_weights!r} must be None (random) or 'zero'")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size <= 0):
            problems.append(f"encoder_hidden_size={self.encoder_hidden_size!r} must be a positive "
                            "integer")
        if problems:
            raise ValueError("invalid PrefixTuningConfig: " + "; ".join(problems) + ".")

    def resolved(self, model) -> PrefixTuningConfig:
        """The config with the model-shape fields PEFT fills (checks given ones)."""
        n_layers, K, D = geometry(model)
        want = {"num_layers": n_layers, "num_attention_heads": K, "token_dim": K * D}
        wrong = {k: (getattr(self, k), v) for k, v in want.items()
                 if getattr(self, k) not in (None, v)}
        if wrong:
            raise ValueError("PrefixTuningConfig does not fit the model: " + ", ".join(
                f"{k}={got} but the model has {v}" for k, (got, v) in wrong.items()) +
                " (under grouped-query attention PEFT counts key/value heads: token_dim = "
                "head_dim * num_key_value_heads).")
        return dataclasses.replace(self, **want, num_transformer_submodules=1,
                                   encoder_hidden_size=self.encoder_hidden_size or K * D)

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        cfg = self.resolved(model)
        V, width = cfg.num_virtual_tokens, cfg.num_layers * 2 * cfg.token_dim
        zero = cfg.init_weights == "zero"
        if not cfg.prefix_projection:
            table = (jnp.zeros((V, width), jnp.float32) if zero else
                     jax.random.normal(rngs.params(), (V, width), jnp.float32))
            return {"prefix_encoder": PrefixEncoder(table)}
        E, Hd = cfg.token_dim, cfg.encoder_hidden_size
        k = jax.random.split(rngs.params(), 5)
        transform = (_uniform(k[1], (E, Hd), E), _uniform(k[2], (Hd,), E),
                     jnp.zeros((Hd, width)) if zero else _uniform(k[3], (Hd, width), Hd),
                     jnp.zeros((width,)) if zero else _uniform(k[4], (width,), Hd))
        return {"prefix_encoder": PrefixEncoder(jax.random.normal(k[0], (V, E), jnp.float32),
                                                transform)}

    def prefix_kv(self, peft_model):
        """Per-layer ``(k, v)`` of shape [1, V, kv_heads, head_dim] in the model's dtype."""
        base = peft_model.base_model
        n_layers, K, D = geometry(base)
        table = peft_model.added["prefix_encoder"]()
        kv = table.reshape(table.shape[0], n_layers, 2, K, D).astype(base.dtype)
        return [(kv[None, :, i, 0], kv[None, :, i, 1]) for i in range(n_layers)]

    def call(self, peft_model, args, kwargs):
        base = peft_model.base_model
        input_ids, embeds = split_inputs(args, kwargs)
        V = self.num_virtual_tokens
        if kwargs.get("cache") is not None:  # from init_cache: the prefix is in its first slots
            return call_with_front_cache(base, V, input_ids, embeds, kwargs)
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        B, T = (input_ids if embeds is None else embeds).shape[:2]
        backbone = getattr(base, "backbone", base)
        if not hasattr(backbone, "init_cache"):  # an encoder: extra keys in every softmax
            mask = kwargs.get("attention_mask")
            if kwargs.get("positions") is None:  # real tokens' positions start after the prefix
                pos = backbone.default_positions(input_ids, mask, B, T)
                real = jnp.ones((B, T), pos.dtype) if mask is None else mask.astype(pos.dtype)
                kwargs["positions"] = pos + V * real
            extra = [ExtraKV(k=k, v=v) for k, v in self.prefix_kv(peft_model)]
            return base(input_ids, inputs_embeds=embeds, extra_kv=extra, **kwargs)
        cache = self._prefilled_cache(peft_model, B, V + T)
        mask = kwargs.pop("attention_mask", None)
        kwargs["attention_mask"] = jnp.ones((B, T), jnp.int32) if mask is None else mask
        kwargs["cache"] = cache
        out = call_with_front_cache(base, V, input_ids, embeds, kwargs)
        return out.replace(cache=None)

    def _prefilled_cache(self, peft_model, batch: int, max_len: int, dtype=None):
        cache = peft_model.base_model.init_cache(batch, max_len, dtype)
        ks, vs = [], []
        V = self.num_virtual_tokens
        for (k, v), ck, cv in zip(self.prefix_kv(peft_model), cache.k, cache.v):
            ks.append(ck.at[:, :V].set(jnp.broadcast_to(k, ck[:, :V].shape).astype(ck.dtype)))
            vs.append(cv.at[:, :V].set(jnp.broadcast_to(v, cv[:, :V].shape).astype(cv.dtype)))
        return cache.replace(k=tuple(ks), v=tuple(vs), index=jnp.asarray(V, jnp.int32))

    def init_cache(self, peft_model, batch: int, max_len: int, dtype=None):
        """A cache of ``num_virtual_tokens + max_len`` slots whose first slots hold the prefix."""
        return self._prefilled_cache(peft_model, batch, self.num_virtual_tokens + max_len, dtype)

    def peft_entries(self, peft_model) -> dict:
        enc = peft_model.added["prefix_encoder"]
        # with the projection, the file holds the prefixes it produces (saving only: loading
        # builds the plain table, see for_loading)
        table = enc() if enc.projected else enc.embedding
        return {"prompt_embeddings": (table, False), **self.head_entries(peft_model)}

    def for_loading(self) -> PrefixTuningConfig:
        return dataclasses.replace(self, prefix_projection=False, init_weights="zero")

    def to_peft_dict(self) -> dict:
        return {**super().to_peft_dict(), "num_transformer_submodules": 1}
