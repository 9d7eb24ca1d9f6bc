"""Attention for every model family: masks, one dot-product attention, its backends.

Every family calls :func:`dot_product_attention` with queries [B, T, H, D], keys and values
[B, S, K, D] (grouped-query when K < H) and a boolean mask [B, T, S] that already holds
causality, padding and sliding windows. How it is computed is chosen when the call is traced
(:func:`set_attention_implementation`, or the ``PEFTJAX_ATTENTION`` environment variable):

- ``xla`` (plain jnp, every backend): softmax in float32 over the heads-first layout
  [B, K, G*T, D] (the G query heads of a key head stacked along the queries), so both products
  are batched matrix products with the batch dimensions leading. The former 5-D einsums
  ([B, T, K, G, D] against [B, S, K, D]) made XLA:CPU copy operands and scores into the
  products' layouts on every call (26 copies/transposes in one layer's forward and backward
  against 13 now; README, "Benchmarks"). Causal self-attention is cut into query blocks that
  see the keys up to their end only (:func:`causal_blocks`).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  attention on NVIDIA GPUs: scores are never materialised, and the causal upper triangle is
  skipped during training (``causal=True``). It needs bfloat16/float16 compute, head_dim a
  multiple of 8 (at most 128, 256 on Hopper), no soft-capping, no attention dropout and no
  prefix keys; the mask is passed as cuDNN's additive bias ([B, 1, T, S], shared by the heads;
  jax also has cuDNN return that bias's gradient, which is discarded).
- ``splash``: the Pallas splash attention kernel of ``jax.experimental.pallas.ops.tpu`` for
  TPUs: blocks of 128-512 queries and keys, blocks above the causal diagonal (or outside a
  sliding window) skipped, scores never materialised. It runs causal self-attention (training,
  evaluation without a cache) whose length is a multiple of 128, without prefix keys or
  attention dropout; grouped-query heads and soft-capping are native. On several devices it
  runs under ``shard_map`` over the mesh set while tracing (``jax.set_mesh``; the run loop
  sets it), batch and heads split as the mesh allows; with no mesh set it refuses the call
  (``auto``: xla, one warning). Padding is expressed as
  segment ids (real tokens 1, padding 0), so a padding query attends to earlier padding
  instead of averaging every value: padding outputs differ from ``xla``'s, real tokens' do not.
  Chosen explicitly off a TPU it runs in Pallas interpret mode (slow; how it is tested on CPU).
- ``auto`` (default): ``cudnn`` where it applies on a GPU, ``splash`` where it applies on a
  TPU, ``xla`` everywhere else. A call the kernel refuses when traced (shape, version) falls
  back to ``xla`` with one warning.

Inside :func:`shifted_sparse_attention` (LongLoRA's training context), self-attention over a
whole sequence is :func:`s2_attention` whatever the setting.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from peftjax.models._layers import dropout, fold

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_implementation: list[str] = []  # the current setting, read from the environment on first use


def _checked(name: str, where: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{where}: unknown attention implementation {name!r}; use one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    return name


def attention_implementation() -> str:
    """The current setting: ``auto``, ``xla``, ``cudnn`` or ``splash`` (see the module doc)."""
    if not _implementation:
        _implementation.append(_checked(os.environ.get("PEFTJAX_ATTENTION", "auto"),
                                        "PEFTJAX_ATTENTION"))
    return _implementation[0]


def set_attention_implementation(name: str) -> str:
    """Chooses how attention is computed from now on; returns the previous setting.

    ``auto`` (cuDNN flash attention where it applies on a GPU, Pallas splash attention where it
    applies on a TPU, else ``xla``), ``xla`` (plain jnp everywhere), ``cudnn`` or ``splash``
    (that kernel, and an error where it cannot run the call, instead of falling back). Read
    when a model call is traced: functions compiled before keep what they were compiled with.

        peftjax.set_attention_implementation("xla")   # e.g. to compare against cuDNN
    """
    previous = attention_implementation()
    _implementation[0] = _checked(name, "set_attention_implementation")
    return previous


@flax.struct.dataclass
class ExtraKV:
    """Extra keys/values for one layer: the single extension point for prompt-style tuners.

    Either ``k``/``v`` [B or 1, P, kv_heads, head_dim], used as given (no rotary embedding), or
    ``prompt`` [B or 1, P, hidden]: hidden states the layer projects into keys/values with its
    own frozen projections (and key norm), also without rotary embedding. They are visible to
    every query.
    - ``gate is None``: they join the layer's keys in one softmax (prefix tuning, encoders).
    - ``gate`` of shape [heads] or [1]: they get their own softmax, whose output is multiplied
      by ``gate`` and added to the attention output (LLaMA-Adapter's zero-initialised gated
      attention).
    """

    k: Array | None = None
    v: Array | None = None
    gate: Array | None = None
    prompt: Array | None = None

    def projected(self, project_kv) -> ExtraKV:
        """``self`` with ``k``/``v`` set: ``project_kv(prompt)`` gives them for a prompt."""
        if self.prompt is None:
            return self
        k, v = project_kv(self.prompt)
        return ExtraKV(k=k, v=v, gate=self.gate)


def attention_mask(q_slots_BT: Array, kv_valid_BS: Array, *, causal: bool,
                   window: int | None) -> Array:
    """Boolean [B, T, S] mask from slot indices (positions in the padded/cached timeline)."""
    kv_slots_S = jnp.arange(kv_valid_BS.shape[1])
    mask = jnp.broadcast_to(kv_valid_BS[:, None, :].astype(bool),
                            (kv_valid_BS.shape[0], q_slots_BT.shape[1], kv_valid_BS.shape[1]))
    if causal:
        mask = mask & (kv_slots_S[None, None, :] <= q_slots_BT[:, :, None])
    if window is not None:
        mask = mask & (kv_slots_S[None, None, :] > q_slots_BT[:, :, None] - window)
    return mask


def _heads_first(x_BSKD: Array) -> Array:
    return x_BSKD.transpose(0, 2, 1, 3)


def _queries_heads_first(q_BTHD: Array, K: int) -> Array:
    """[B, T, H, D] -> [B, K, G*T, D]: the G = H / K query heads sharing key head k stacked
    along the queries, so every product is a plain batched matrix product."""
    B, T, H, D = q_BTHD.shape
    return q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, D)


def _tokens_first(out_BKQD: Array, T: int) -> Array:
    """The inverse of :func:`_queries_heads_first`: [B, K, G*T, D] -> [B, T, H, D]."""
    B, K, Q, D = out_BKQD.shape
    G = Q // T
    return out_BKQD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def _scores(q_BKQD: Array, k_BKSD: Array, scale: float, softcap: float | None) -> Array:
    s = jnp.einsum("bkqd,bksd->bkqs", q_BKQD, k_BKSD.astype(q_BKQD.dtype),
                   preferred_element_type=jnp.float32) * scale
    return jnp.tanh(s / softcap) * softcap if softcap is not None else s


# LongLoRA's shifted sparse attention: the group size as a fraction of the sequence, set while
# a train step is traced (peftjax.procedures' longlora); None: full attention
_S2_GROUP_RATIO: contextvars.ContextVar = contextvars.ContextVar("s2_group_ratio", default=None)


@contextlib.contextmanager
def shifted_sparse_attention(group_size_ratio: float | None):
    """Within this context (at trace time), self-attention over a whole sequence of length T
    is LongLoRA's S2-Attn with groups of ``T * group_size_ratio`` tokens (see
    :func:`s2_attention`); attention over a cache (generation) stays full."""
    token = _S2_GROUP_RATIO.set(group_size_ratio)
    try:
        yield
    finally:
        _S2_GROUP_RATIO.reset(token)


def s2_group_size(T: int, ratio: float) -> int:
    """The S2-Attn group size for sequence length ``T`` (even, dividing ``T``)."""
    g = int(round(T * ratio))
    if g < 2 or g % 2 or T % g:
        raise ValueError(f"shifted sparse attention: group_size_ratio={ratio} gives groups of "
                         f"{T * ratio:g} tokens at sequence length {T}; a group must be an even "
                         f"number of tokens that divides the length (choose lengths/buckets that "
                         "are multiples of 2 / group_size_ratio)")
    return g


def s2_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, mask_BTS: Array, *, group: int,
                 scale: float, softcap: float | None = None, dropout_rate: float = 0.0,
                 dropout_rng: Array | None = None) -> Array:
    """LongLoRA's shifted sparse attention (S2-Attn) over a sequence (keys = queries, T = S):
    the sequence is cut into groups of ``group`` tokens and each query attends only within its
    group; the second half of the heads (keys/values repeated per query head, as LongLoRA does
    for grouped-query models) works on the sequence shifted by half a group, so their groups
    straddle the first half's boundaries. ``mask_BTS`` (causal, padding, windows) still
    applies, taken at the original positions: the group that wraps around the end (the paper's
    roll) lets a token see only what the mask allows, so nothing leaks from the future.
    Scores, softmax and their gradients cost O(T * group) instead of O(T^2); the boolean
    ``mask_BTS`` the model builds stays [B, T, T], as for full attention. Returns [B, T, H, D]."""
    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    if k_BSKD.shape[1] != T or T % group:
        raise ValueError(f"S2-Attn needs keys for the whole sequence and groups dividing it "
                         f"(T={T}, S={k_BSKD.shape[1]}, group={group})")
    k_BTHD = jnp.repeat(k_BSKD, H // K, axis=2)
    v_BTHD = jnp.repeat(v_BSKD, H // K, axis=2)
    N, half, shift = T // group, H // 2, group // 2
    neg = jnp.finfo(jnp.float32).min

    def grouped(q, k, v, mask, rng):
        h = q.shape[2]
        # heads before tokens ([B, N, h, g, D]): both products batched over leading dimensions,
        # as in the full-attention path
        q, k, v = (a.reshape(B, N, group, h, D).transpose(0, 1, 3, 2, 4) for a in (q, k, v))
        m = jnp.diagonal(mask.reshape(B, N, group, N, group), axis1=1, axis2=3)  # [B, g, g, N]
        m = jnp.moveaxis(m, -1, 1)  # [B, N, g, g]
        s = jnp.einsum("bnhtd,bnhsd->bnhts", q, k.astype(q.dtype),
                       preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        p = jax.nn.softmax(jnp.where(m[:, :, None], s, neg), axis=-1)
        p = dropout(p, dropout_rate, rng).astype(q.dtype)
        out = jnp.einsum("bnhts,bnhsd->bnhtd", p, v.astype(q.dtype))
        return out.transpose(0, 1, 3, 2, 4).reshape(B, T, h, D)

    def roll(a, n):
        return jnp.roll(a, n, axis=1)

    plain = grouped(q_BTHD[:, :, :half], k_BTHD[:, :, :half], v_BTHD[:, :, :half], mask_BTS,
                    fold(dropout_rng, 0))
    mask_rolled = jnp.roll(roll(mask_BTS, -shift), -shift, axis=2)
    shifted = grouped(roll(q_BTHD[:, :, half:], -shift), roll(k_BTHD[:, :, half:], -shift),
                      roll(v_BTHD[:, :, half:], -shift), mask_rolled, fold(dropout_rng, 1))
    return jnp.concatenate([plain, roll(shifted, shift)], axis=2)


def dot_product_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, mask_BTS: Array, *,
                          scale: float, softcap: float | None = None,
                          extra: ExtraKV | None = None, dropout_rate: float = 0.0,
                          dropout_rng: Array | None = None, causal: bool = False,
                          window: int | None = None) -> Array:
    """Grouped-query attention with softmax in float32; returns [B, T, H, D].

    Masked scores are set to the most negative float32 (not -inf), so a query that sees no key
    (a padding row) gets a uniform distribution instead of NaN. ``extra`` (projected) adds
    keys/values as :class:`ExtraKV` describes. ``causal``: the caller's promise that keys are
    the queries (S = T, no cache) and ``mask_BTS`` lets no query see a later key, so a fused
    kernel may skip the upper triangle (the mask still applies). ``window``: the sliding window
    ``mask_BTS`` holds (keys within ``window`` slots of the query), which a fused kernel needs
    to know statically (``xla`` reads the mask only). The implementation follows
    :func:`set_attention_implementation`; inside :func:`shifted_sparse_attention`,
    self-attention over a whole sequence is :func:`s2_attention`.
    """
    T = q_BTHD.shape[1]
    ratio = _S2_GROUP_RATIO.get()
    if ratio is not None and T == k_BSKD.shape[1]:
        if extra is not None:
            raise ValueError("shifted sparse attention (LongLoRA) does not combine with "
                             "prefix / adaption-prompt keys; use it with LoRA")
        out = s2_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, group=s2_group_size(T, ratio),
                           scale=scale, softcap=softcap, dropout_rate=dropout_rate,
                           dropout_rng=dropout_rng)
        return checkpoint_name(out, "attn_out")
    gated = extra is not None and extra.gate is not None
    prefix = extra if extra is not None and not gated else None  # keys in the same softmax
    dropping = dropout_rng is not None and dropout_rate > 0.0
    out_BTHD = None
    kernel = _kernel_for_call()
    if kernel == "cudnn":
        out_BTHD = _try_kernel("cudnn", lambda: jax.nn.dot_product_attention(
            q_BTHD, k_BSKD.astype(q_BTHD.dtype), v_BSKD.astype(q_BTHD.dtype),
            mask=mask_BTS[:, None], scale=scale, is_causal=causal, implementation="cudnn"),
            _cudnn_excluded(q_BTHD, softcap, prefix, dropping))
    elif kernel == "splash":
        out_BTHD = _try_kernel("splash", lambda: _splash_attention(
            q_BTHD, k_BSKD, v_BSKD, mask_BTS, scale=scale, softcap=softcap, window=window),
            _splash_excluded(T, causal, prefix, dropping))
    if out_BTHD is None:
        # random dropout bits follow the scores' shape, and prefix keys precede every query's
        # keys: both keep the uncut call
        n = causal_blocks(T, causal=causal and prefix is None and not dropping)
        kw = dict(scale=scale, softcap=softcap, extra=prefix, dropout_rate=dropout_rate,
                  dropout_rng=dropout_rng)
        b, S = T // n, k_BSKD.shape[1]
        ends = [S - T + (i + 1) * b for i in range(n)]  # block i sees keys of blocks 0..i only
        out_BTHD = jnp.concatenate([
            _xla_attention(q_BTHD[:, i * b:(i + 1) * b], k_BSKD[:, :e], v_BSKD[:, :e],
                           mask_BTS[:, i * b:(i + 1) * b, :e], **kw)
            for i, e in enumerate(ends)], axis=1)
    if gated:
        out_BTHD = out_BTHD + gated_attention(q_BTHD, extra, scale=scale, softcap=softcap)
    return checkpoint_name(out_BTHD, "attn_out")


def causal_blocks(T: int, *, causal: bool, min_block: int = 64, max_blocks: int = 8) -> int:
    """How many query blocks the ``xla`` path cuts causal self-attention into: block i attends
    to the keys of blocks 0..i only, so (n + 1) / 2n of the scores are computed and held
    instead of all (n = 4: 62%; 8: 56%), with the same values for every query that sees a key
    (a masked key adds exactly 0 to a softmax that has one real score). Blocks of at least
    ``min_block`` tokens, at most ``max_blocks`` of them, dividing T; 1 (no cut) when not
    ``causal`` (:func:`dot_product_attention` passes False with prefix keys or attention
    dropout). A query that sees no key (left padding) averages the values of its block's
    visible range instead of all of them: padding outputs differ, real tokens' do not."""
    if not causal:
        return 1
    n = min(max_blocks, T // min_block)
    while n > 1 and T % n:
        n -= 1
    return max(n, 1)


def _xla_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, *, scale, softcap, extra, dropout_rate,
                   dropout_rng) -> Array:
    B, T, H, _ = q_BTHD.shape
    K = k_BSKD.shape[2]
    q_BKQD = _queries_heads_first(q_BTHD, K)
    neg = jnp.finfo(jnp.float32).min
    s_BKGTS = _scores(q_BKQD, _heads_first(k_BSKD), scale, softcap).reshape(B, K, H // K, T, -1)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, neg)
    v_BKSD = _heads_first(v_BSKD)
    if extra is not None:  # prefix keys: in the same softmax, before the sequence's keys
        ek, ev = (_heads_first(jnp.broadcast_to(a, (B,) + a.shape[1:])) for a in (extra.k, extra.v))
        s_BKGTP = _scores(q_BKQD, ek, scale, softcap).reshape(B, K, H // K, T, -1)
        s_BKGTS = jnp.concatenate([s_BKGTP, s_BKGTS], axis=-1)
        v_BKSD = jnp.concatenate([ev.astype(v_BKSD.dtype), v_BKSD], axis=2)
    p = jax.nn.softmax(s_BKGTS, axis=-1)
    p = dropout(p, dropout_rate, dropout_rng).astype(q_BTHD.dtype)
    out_BKQD = jnp.einsum("bkqs,bksd->bkqd", p.reshape(B, K, -1, p.shape[-1]),
                          v_BKSD.astype(q_BTHD.dtype))
    return _tokens_first(out_BKQD, T)


def _kernel_for_call() -> str | None:
    """The fused kernel the setting asks for on this backend (None: the ``xla`` path)."""
    name = attention_implementation()
    if name == "auto":
        return {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend())
    return None if name == "xla" else name


def _cudnn_excluded(q_BTHD, softcap, prefix, dropping: bool) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None when it may."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not an NVIDIA GPU"
    if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it needs bfloat16 or float16 compute, not {q_BTHD.dtype}"
    if softcap is not None:
        return "it has no attention soft-capping (Gemma 2)"
    if prefix is not None:
        return "prefix keys join the softmax (prefix tuning)"
    if dropping:
        return "attention dropout is active"
    return None


SPLASH_BLOCKS = (512, 256, 128)  # query/key block sizes tried, largest first (multiples of 128)


def _splash_excluded(T: int, causal: bool, prefix, dropping: bool) -> str | None:
    """Why the splash kernel cannot run this call, or None when it may."""
    if not causal:
        return ("it runs causal self-attention only (encoders and calls over a KV cache use "
                "the xla path)")
    if prefix is not None:
        return "prefix keys join the softmax (prefix tuning)"
    if dropping:
        return "attention dropout is active"
    if T % SPLASH_BLOCKS[-1]:
        return (f"the sequence length {T} is not a multiple of {SPLASH_BLOCKS[-1]} (choose "
                f"data.buckets / max_length that are)")
    return None


def _tracing_mesh():
    """The mesh set while tracing (``jax.set_mesh``), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


@functools.lru_cache(maxsize=64)
def _splash_kernel(H: int, T: int, window: int | None, softcap: float | None, interpret: bool):
    """The splash kernel for H heads over T tokens, causal (within ``window``)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    # a key is seen when it is at most window - 1 slots before the query (attention_mask)
    one = (sm.CausalMask((T, T)) if window is None else
           sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0))
    b = next(b for b in SPLASH_BLOCKS if T % b == 0)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                          block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sk.make_splash_mha(mask=sm.MultiHeadMask([one] * H), head_shards=1, q_seq_shards=1,
                              block_sizes=sizes, attn_logits_soft_cap=softcap,
                              interpret=interpret)


def _splash_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS, *, scale, softcap, window) -> Array:
    """Causal self-attention through the splash kernel; padding as segment ids read off the
    mask's diagonal (a slot sees itself exactly when it is a real token). On several devices
    the kernel runs under ``shard_map`` over the tracing mesh: the batch split over every mesh
    axis but ``tensor`` (where they divide it), the heads over ``tensor`` (where it divides
    both head counts, keeping each query head with its key head), replicated otherwise;
    without a mesh set while tracing, several devices are refused (ValueError)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    B, T, H, _ = q_BTHD.shape
    K = k_BSKD.shape[2]
    mesh = _tracing_mesh() if jax.device_count() > 1 else None
    if jax.device_count() > 1 and mesh is None:
        raise ValueError("there are several devices and no mesh is set while the call is "
                         "traced (trace it inside `with jax.set_mesh(mesh):`, as peftjax's run "
                         "loop does)")
    real_BT = jnp.diagonal(mask_BTS, axis1=1, axis2=2).astype(jnp.int32)
    dtype = q_BTHD.dtype
    q_BTHD = q_BTHD * jnp.asarray(scale, dtype)
    k_BSKD, v_BSKD = k_BSKD.astype(dtype), v_BSKD.astype(dtype)

    def attend(q_BTHD, k_BSKD, v_BSKD, real_BT):  # on the (local) arrays
        kernel = _splash_kernel(q_BTHD.shape[2], T, window, softcap,
                                jax.default_backend() != "tpu")

        def one(q, k, v, segments):
            return kernel(q, k, v, segment_ids=sk.SegmentIds(q=segments, kv=segments))

        heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
        return heads_first(jax.vmap(one)(heads_first(q_BTHD), heads_first(k_BSKD),
                                         heads_first(v_BSKD), real_BT))

    if mesh is None:
        return attend(q_BTHD, k_BSKD, v_BSKD, real_BT)
    shape = dict(mesh.shape)
    batch, n = [], 1
    for axis in mesh.axis_names:
        if axis != "tensor" and shape[axis] > 1 and B % (n * shape[axis]) == 0:
            batch.append(axis)
            n *= shape[axis]
    t = shape.get("tensor", 1)
    heads = "tensor" if t > 1 and H % t == 0 and K % t == 0 else None
    rows = tuple(batch) if batch else None
    spec = jax.sharding.PartitionSpec(rows, None, heads, None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec,
                                                      jax.sharding.PartitionSpec(rows, None)),
                         out_specs=spec, check_vma=False)(q_BTHD, k_BSKD, v_BSKD, real_BT)


_warned: set[str] = set()
_LABELS = {"cudnn": "cuDNN"}


def _try_kernel(name: str, run, why_not: str | None) -> Array | None:
    """``run()`` (the fused kernel ``name``), or None (``auto``) where it does not apply
    (``why_not``) or refuses the call when traced; the kernel asked for explicitly raises
    instead. Under ``auto`` a refusal warns once."""
    refused = False
    if why_not is None:
        try:
            return run()
        except (NotImplementedError, ValueError, RuntimeError) as e:  # refused when traced
            why_not, refused = f"{_LABELS.get(name, name)} refused it: {e}", True
    if attention_implementation() == name:
        raise ValueError(f"attention implementation {name!r} cannot run this call: {why_not}; "
                         f"use set_attention_implementation('auto') ({name} where it applies) "
                         "or 'xla'")
    if refused and why_not not in _warned:
        _warned.add(why_not)
        warnings.warn(f"attention falls back to the XLA path: {why_not}", stacklevel=3)
    return None


def gated_attention(q_BTHD: Array, extra: ExtraKV, *, scale: float,
                    softcap: float | None = None) -> Array:
    """LLaMA-Adapter's term: ``gate * softmax(q k_extra^T) v_extra`` per head, [B, T, H, D]
    (its own softmax over the extra keys only, in float32)."""
    B, T, H, D = q_BTHD.shape
    K = extra.k.shape[2]
    q_BKQD = _queries_heads_first(q_BTHD, K)
    ek, ev = (_heads_first(jnp.broadcast_to(a, (B,) + a.shape[1:])) for a in (extra.k, extra.v))
    pe = jax.nn.softmax(_scores(q_BKQD, ek, scale, softcap), axis=-1).astype(q_BTHD.dtype)
    out_BKQD = jnp.einsum("bkqp,bkpd->bkqd", pe, ev.astype(q_BTHD.dtype))
    gate_KG = jnp.broadcast_to(jnp.asarray(extra.gate).reshape(-1), (H,)).reshape(K, H // K)
    out_BKGTD = out_BKQD.reshape(B, K, H // K, T, D) * gate_KG[:, :, None, None].astype(
        q_BTHD.dtype)
    return _tokens_first(out_BKGTD.reshape(B, K, -1, D), T)
