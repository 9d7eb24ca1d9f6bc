"""Building blocks shared by every model family.

Each parameterised layer declares ``hf_params``: how its parameters are named in a Hugging Face
checkpoint and whether the stored matrix is transposed relative to ours. Loading, saving and
(later) PEFT key mapping all read that one table, so a new layer type only has to declare it.

Parameters carry logical axis names in the ``axes`` metadata (``vocab``, ``embed``, ``heads``
for the flattened query heads x head_dim, ``kv_heads`` likewise for keys/values, ``head_dim``,
``mlp``, ``qkv``, ``positions``, ``labels``) so a mesh can place them without touching models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._config import UnsupportedConfigError
from peftjax.models._remat import (CHECKPOINT_NAMES, REMAT_POLICIES, call_block,  # noqa: F401
                                  current_block, remat_policy, run_blocks,
                                  traced_context)

Array = jax.Array
DType = Any


def param_value(p: nnx.Variable) -> Array:
    return p[...]


def init_kw(cfg, dtype: DType, param_dtype: DType, rngs: nnx.Rngs) -> dict:
    """Keyword arguments every parameterised layer of a model takes."""
    return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)


def fold(rng: Array | None, i: int) -> Array | None:
    """A distinct dropout key per use site; None stays None (no dropout).

    Layers use their index as site; embeddings and heads use negative sites (-1, -2, ...),
    mapped to the top of the uint32 range so they never collide with a layer index."""
    return None if rng is None else jax.random.fold_in(rng, i % 2**32)


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel`` of shape [in, out] (HF ``weight`` is [out, in])."""

    hf_params = {"kernel": ("weight", True), "bias": ("bias", False)}
    quantized = False  # True for peftjax.quant.QuantizedLinear (a 4-bit weight, no ``kernel``)

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
                 axes: tuple[str, str], dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        kernel_IxO = init_std * jax.random.normal(rngs.params(), (in_features, out_features))
        self.kernel = nnx.Param(kernel_IxO.astype(param_dtype), axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[1],))
                     if use_bias else None)

    def __call__(self, x: Array) -> Array:
        y = jnp.dot(x.astype(self.dtype), param_value(self.kernel).astype(self.dtype))
        if self.bias is not None:
            y = y + param_value(self.bias).astype(self.dtype)
        return y

    @property
    def weight_axes(self) -> tuple:
        """Logical axes (in, out) of the weight."""
        return tuple(self.kernel.get_metadata().get("axes", (None, None)))

    @property
    def weight_dtype(self):
        """Storage dtype of the weight (for a 4-bit layer: the dtype it had before)."""
        return self.kernel.dtype

    def rebuild_kwargs(self) -> dict:
        """Constructor arguments that rebuild this layer's structure (without ``rngs``)."""
        return dict(in_features=self.in_features, out_features=self.out_features,
                    use_bias=self.bias is not None, axes=self.weight_axes, dtype=self.dtype,
                    param_dtype=self.weight_dtype)


class Conv1D(Linear):
    """GPT-2's ``Conv1D``: a linear layer whose HF ``weight`` is already stored [in, out]."""

    hf_params = {"kernel": ("weight", False), "bias": ("bias", False)}


class Embed(nnx.Module):
    """Token (or position) embedding table [num, features]; ``attend`` is the tied output head."""

    hf_params = {"embedding": ("weight", False)}

    def __init__(self, num: int, features: int, *, axes: tuple[str, str], dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs, init_std: float = 0.02):
        self.dtype = dtype
        table = init_std * jax.random.normal(rngs.params(), (num, features))
        self.embedding = nnx.Param(table.astype(param_dtype), axes=axes)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(param_value(self.embedding), ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return jnp.dot(x.astype(self.dtype), param_value(self.embedding).astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """RMS normalisation computed in float32.

    ``offset=0`` is Llama's ``w * norm(x)`` (rounded to the input dtype before the scale);
    ``offset=1`` is Gemma's ``(1 + w) * norm(x)`` computed entirely in float32.
    """

    hf_params = {"scale": ("weight", False)}

    def __init__(self, features: int, *, eps: float, offset: float = 0.0, axes=("embed",),
                 dtype: DType, param_dtype: DType):
        self.eps, self.offset, self.dtype = eps, offset, dtype
        self.scale = nnx.Param(jnp.full((features,), 1.0 - offset, param_dtype), axes=axes)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = param_value(self.scale)
        if self.offset:
            return (normed * (self.offset + w.astype(jnp.float32))).astype(self.dtype)
        return w.astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm with scale and bias, statistics in float32."""

    hf_params = {"scale": ("weight", False), "bias": ("bias", False)}

    def __init__(self, features: int, *, eps: float, dtype: DType, param_dtype: DType):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), axes=("embed",))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * param_value(self.scale).astype(jnp.float32) + param_value(self.bias).astype(jnp.float32)
        return y.astype(self.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def join_residual(block: nnx.Module, site: str, h: Array, x: Array, norm=None) -> Array:
    """Where a sublayer's output ``h`` joins the residual stream ``x``: ``x + h``, or
    ``norm(h + x)`` in a post-norm block (BERT) that passes its LayerNorm. A module the block
    holds under ``site`` (``"attention_adapters"`` after attention, ``"output_adapters"`` after
    the feed-forward block: where bottleneck adapters sit) takes over the join."""
    hook = getattr(block, site, None)
    if hook is not None:
        return hook(h, x, norm)
    return add_residual(h, x, norm)


def add_residual(h: Array, x: Array, norm=None) -> Array:
    """The plain join: ``x + h``, or ``norm(h + x)`` for a post-norm block."""
    return x + h if norm is None else norm(h + x)


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    """Inverted dropout; the identity when ``rng`` is None (evaluation) or ``rate`` is 0.

    The keep test draws 16 random bits per element (not a float uniform: random numbers dominate
    the cost of dropout on CPU), so the drop probability is ``rate`` rounded to a multiple of
    1/65536 (off by < 8e-6)."""
    if rng is None or rate == 0.0:
        return x
    bits = jax.random.bits(rng, x.shape, jnp.uint16)
    keep = bits >= jnp.uint16(min(round(rate * 65536), 65535))
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0).astype(x.dtype)


# ----------------------------------------------------------------------------------- rotary


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding constants: inverse frequencies (head_dim / 2) and the cos/sin scale."""

    inv_freq: tuple[float, ...]
    attention_scaling: float = 1.0


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def make_rope(head_dim: int, params: dict, where: str) -> Rope:
    """Builds a :class:`Rope` from HF rope parameters (``rope_theta`` plus optional scaling).

    ``params`` holds ``rope_theta`` and, for scaled variants, ``rope_type`` (or legacy ``type``)
    with its fields. ``where`` names the config for error messages.
    """
    theta = float(params["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedConfigError(f"{where}: partial_rotary_factor="
                                     f"{params['partial_rotary_factor']} is not supported (only 1.0).")
    # Same float32 arithmetic as the reference implementation, so angles agree to the last bit.
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = (inv_freq / np.float32(params["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    else:
        raise UnsupportedConfigError(f"{where}: rope type {kind!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
    return Rope(tuple(float(f) for f in inv_freq))


def apply_rope(x_BTHD: Array, positions_BT: Array, rope: Rope) -> Array:
    inv_freq = jnp.asarray(rope.inv_freq, jnp.float32)
    freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb_BTD = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)
    cos = (jnp.cos(emb_BTD) * rope.attention_scaling).astype(x_BTHD.dtype)[:, :, None, :]
    sin = (jnp.sin(emb_BTD) * rope.attention_scaling).astype(x_BTHD.dtype)[:, :, None, :]
    half = x_BTHD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTHD[..., half:], x_BTHD[..., :half]], axis=-1)
    return x_BTHD * cos + rotated * sin


@flax.struct.dataclass
class KVCache:
    """Preallocated key/value cache: per layer [B, S_max, kv_heads, head_dim].

    ``index`` is the slot where the next token is written: a scalar (every row in step, as in
    ``peftjax.generate``) or one slot per row [B] (rows at different points of their sequences,
    as a continuous-batching server keeps them). Slots are positions in the padded timeline,
    not position ids; which slots hold real tokens is the caller's attention mask.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    index: Array

    @classmethod
    def create(cls, *, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype: DType) -> KVCache:
        zeros = lambda: jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)  # noqa: E731
        return cls(tuple(zeros() for _ in range(num_layers)),
                   tuple(zeros() for _ in range(num_layers)), jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def layer(self, i: int) -> tuple[Array, Array]:
        return self.k[i], self.v[i]


def embed_inputs(input_ids, inputs_embeds, embed: Embed, dtype: DType) -> Array:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    return embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(dtype)


def causal_slots(B: int, T: int, attention_mask, cache: KVCache | None):
    """The preamble of a causal stack: ``(attention_mask [B, S], offset, q_slots [1, T])``.

    S is T without a cache and the cache length with one; the current tokens occupy slots
    ``offset .. offset + T - 1`` (``offset`` and ``q_slots`` per row [B] / [B, T] when the cache
    index is per row). A missing mask means every slot holds a real token.
    """
    offset = cache.index if cache is not None else 0
    S = cache.max_len if cache is not None else T
    if attention_mask is None:
        attention_mask = jnp.ones((B, S), jnp.int32)
    if attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {(B, S)} "
                         f"({'the cache length' if cache is not None else 'the input length'}).")
    if jnp.ndim(offset) == 1:  # a per-row cache index
        return attention_mask, offset, jnp.arange(T, dtype=jnp.int32)[None, :] + offset[:, None]
    return attention_mask, offset, (jnp.arange(T, dtype=jnp.int32) + offset)[None, :]


def default_positions(attention_mask_BS: Array, T: int, offset) -> Array:
    """Position ids of the T current tokens: the count of real tokens before each slot."""
    pos_BS = jnp.cumsum(attention_mask_BS.astype(jnp.int32), axis=-1) - 1
    if jnp.ndim(offset) == 1:  # a per-row cache index
        slots_BT = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        return jnp.maximum(jnp.take_along_axis(pos_BS, slots_BT, axis=1), 0)
    return jnp.maximum(jax.lax.dynamic_slice_in_dim(pos_BS, offset, T, axis=1), 0)


def next_cache(cache: KVCache | None, kvs: list, T: int) -> KVCache | None:
    """The cache after T tokens, from each layer's updated (k, v)."""
    if cache is None:
        return None
    return KVCache(tuple(k for k, _ in kvs), tuple(v for _, v in kvs), cache.index + T)


def update_cache(cache_k: Array, cache_v: Array, k_BTKD: Array, v_BTKD: Array,
                 index: Array) -> tuple[Array, Array]:
    if jnp.ndim(index) == 1:  # a per-row cache index: each row writes at its own slot
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (i, 0, 0)))
        return (write(cache_k, k_BTKD.astype(cache_k.dtype), index),
                write(cache_v, v_BTKD.astype(cache_v.dtype), index))
    start = (0, index, 0, 0)
    return (jax.lax.dynamic_update_slice(cache_k, k_BTKD.astype(cache_k.dtype), start),
            jax.lax.dynamic_update_slice(cache_v, v_BTKD.astype(cache_v.dtype), start))


@flax.struct.dataclass
class OutputHead:
    """A causal LM's logits as a linear map: ``h @ weight`` ([embed, vocab]) or, tied to the
    input embeddings, ``h @ weight.T`` ([vocab, embed]) with ``transposed``; computed in
    ``dtype``, then soft-capped (``cap * tanh(logits / cap)``) when ``softcap`` is set."""

    weight: Array
    transposed: bool = flax.struct.field(pytree_node=False, default=False)
    softcap: float | None = flax.struct.field(pytree_node=False, default=None)
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)

    def logits(self, h: Array) -> Array:
        w = self.weight.astype(self.dtype)
        y = jnp.dot(h.astype(self.dtype), w.T if self.transposed else w)
        return y if self.softcap is None else jnp.tanh(y / self.softcap) * self.softcap


@flax.struct.dataclass
class ModelOutput:
    """What every model returns. ``logits`` is None for feature models; ``pooled`` is BERT's
    pooler output where it exists; ``cache`` is the updated KV cache when one was passed."""

    hidden_states: Array
    logits: Array | None = None
    pooled: Array | None = None
    cache: KVCache | None = None


def last_token_index(attention_mask_BT: Array | None, seq_len: int, batch: int) -> Array:
    """Index of the rightmost real token per row (works for left and right padding)."""
    if attention_mask_BT is None:
        return jnp.full((batch,), seq_len - 1, jnp.int32)
    idx = jnp.arange(seq_len, dtype=jnp.int32)
    return jnp.max(jnp.where(attention_mask_BT.astype(bool), idx, 0), axis=-1)


def first_token(hidden_BTE: Array, attention_mask_BT: Array | None) -> Array:
    """[B, E] hidden state of the leftmost real token per row (the [CLS] slot of an encoder,
    wherever the padding is)."""
    if attention_mask_BT is None:
        return hidden_BTE[:, 0]
    first_B = jnp.argmax(attention_mask_BT.astype(bool), axis=-1)
    return hidden_BTE[jnp.arange(hidden_BTE.shape[0]), first_B]


def pool(hidden_BTE: Array, attention_mask_BT: Array | None, how: str = "mean",
         normalize: bool = False) -> Array:
    """Pools hidden states to one vector per sequence.

    ``how``: ``mean`` (masked mean, as sentence-transformers), ``cls`` (leftmost real token),
    ``last`` (rightmost real token); padding may be on either side. With ``normalize`` the result has unit L2 norm.
    """
    B, T, _ = hidden_BTE.shape
    h = hidden_BTE.astype(jnp.float32)
    if how == "mean":
        m = (jnp.ones((B, T)) if attention_mask_BT is None else attention_mask_BT).astype(jnp.float32)
        out = jnp.sum(h * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1e-9)
    elif how == "cls":
        out = first_token(h, attention_mask_BT)
    elif how == "last":
        out = h[jnp.arange(B), last_token_index(attention_mask_BT, T, B)]
    else:
        raise ValueError(f"pool: unknown pooling {how!r}; use 'mean', 'cls' or 'last'.")
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out
