"""Batched text generation with a preallocated KV cache, compiled once per shape bucket.

Prompts are left-padded to a multiple of ``bucket`` tokens; prefill and the whole decode loop
(a ``lax.while_loop``) run in one jitted function whose static arguments are the bucket
length, ``max_new_tokens`` and the sampling mode, so new prompts of similar length reuse the
compiled program and no token triggers a recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass
class Generation:
    """``tokens`` [B, max_new_tokens] (``pad_token_id`` after a sequence ended), ``lengths`` [B]
    (generated tokens including the EOS), and ``texts`` when a tokenizer was given."""

    tokens: np.ndarray
    lengths: np.ndarray
    texts: list[str] | None = None

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def _filter_logits(logits_BV, temperature, top_k: int, top_p):
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)

    def nucleus(logits_BV):
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest set of top tokens whose mass reaches top_p (always at least one)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits_BV < threshold, neg, logits_BV)

    # the vocabulary sort only when some mass is cut (top_p is traced: one program for all)
    return jax.lax.cond(jnp.any(top_p < 1.0), nucleus, lambda x: x, logits_BV)


def _next_token(logits_BV, key, temperature=1.0, top_p=1.0, *, greedy: bool, top_k: int):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, _filter_logits(logits_BV, temperature, top_k, top_p)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k"))
def _generate(graphdef, state, ids_BT, mask_BT, rng, temperature, top_p, eos_ids, pad_id,
              task_ids, *, max_new_tokens: int, greedy: bool, top_k: int):
    model = nnx.merge(graphdef, state)
    B, T = ids_BT.shape
    cache = (model.init_cache(B, T + max_new_tokens) if task_ids is None else
             model.init_cache(B, T + max_new_tokens, task_ids=task_ids))
    mask_BS = jnp.zeros((B, T + max_new_tokens), jnp.int32).at[:, :T].set(mask_BT)
    out = model(ids_BT, attention_mask=mask_BS, cache=cache, last_logits_only=True)
    rng, key = jax.random.split(rng)
    tok = _next_token(out.logits[:, -1], key, temperature, top_p, greedy=greedy, top_k=top_k)
    sample = functools.partial(_next_token, temperature=temperature, top_p=top_p, greedy=greedy,
                               top_k=top_k)
    return continue_tokens(model, tok, out.cache, mask_BS, T, eos_ids, pad_id,
                           max_new_tokens=max_new_tokens, sample=sample, rng=rng)


def continue_tokens(model, tok_B, cache, mask_BS, slot, eos_ids, pad_id, *,
                    max_new_tokens: int, sample=None, rng=None):
    """The decode loop after a prefill: ``tok_B`` is each row's first new token, ``cache`` the
    prefilled cache (its index scalar or per row), ``mask_BS`` marks the real slots so far and
    ``slot`` (scalar or [B]) is where the first new token goes in the caller's slots. Each
    step writes its token, stops rows at an EOS (``eos_ids``) and picks the next token with
    ``sample(logits_BV, key)`` (default greedy). Returns ``(tokens [B, max_new_tokens]
    (pad_id after a row ended), lengths [B])`` (inside jit)."""
    B = tok_B.shape[0]
    rows = jnp.arange(B)
    if sample is None:
        sample = lambda logits, key: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    rng = jax.random.key(0) if rng is None else rng

    def record(step, tok, done, tokens, lengths):
        tokens = tokens.at[:, step].set(jnp.where(done, pad_id, tok))
        return tokens, lengths + (~done).astype(jnp.int32), done | jnp.isin(tok, eos_ids)

    def cond(carry):
        step, _, _, _, done, _, _, _ = carry
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def body(carry):  # records token `step` and computes the next (the last needs no model call)
        step, tok, cache, mask_BS, done, tokens, lengths, rng = carry
        tokens, lengths, done = record(step, tok, done, tokens, lengths)
        at = slot + step
        mask_BS = mask_BS.at[rows, at].set(1) if jnp.ndim(at) else mask_BS.at[:, at].set(1)
        out = model(tok[:, None], attention_mask=mask_BS, cache=cache, last_logits_only=True)
        rng, key = jax.random.split(rng)
        return (step + 1, sample(out.logits[:, -1], key), out.cache, mask_BS, done, tokens,
                lengths, rng)

    carry = (jnp.int32(0), tok_B, cache, mask_BS, jnp.zeros((B,), bool),
             jnp.full((B, max_new_tokens), pad_id, jnp.int32), jnp.zeros((B,), jnp.int32), rng)
    step, tok, _, _, done, tokens, lengths, _ = jax.lax.while_loop(cond, body, carry)
    tokens, lengths, _ = record(step, tok, done, tokens, lengths)  # padding if all ended
    return tokens, lengths


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, bucket: int | None):
    longest = max(len(r) for r in rows)
    if longest == 0:
        raise ValueError("generate: every prompt is empty; give at least one token per prompt.")
    T = longest if not bucket else -(-longest // bucket) * bucket
    ids = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"generate: prompt {i} is empty.")
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


def generate(model: nnx.Module, inputs, *, tokenizer=None, attention_mask=None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, rng: jax.Array | None = None,
             bucket: int | None = 64, task_ids=None) -> Generation:
    """Generates up to ``max_new_tokens`` tokens for each prompt of a batch.

    Args:
      model: a causal LM (``task="causal_lm"``).
      inputs: a list of strings (needs ``tokenizer``; apply a chat template first if wanted),
        a list of token-id lists, or an int array [B, T] with ``attention_mask`` (any padding
        side; rows are re-packed to the left).
      temperature: 0 means greedy decoding; otherwise sample with ``top_k`` (0 = off) and
        ``top_p`` (1.0 = off) filtering.
      eos_token_id: one id or several; a sequence stops at the first. Default: the
        tokenizer's EOS, if any.
      bucket: prompt lengths are padded up to a multiple of this, bounding recompilation.
      task_ids: [B] task of each prompt, for a multi-task prompt bank
        (``PromptTuningConfig(num_tasks=N)``).

    Returns:
      :class:`Generation` with the new tokens (not the prompt).

    Example::

      tok = load_tokenizer(path)
      prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
      print(generate(model, [prompt], tokenizer=tok, max_new_tokens=40).texts[0])
    """
    from peftjax.models import task_of

    if task_of(model) != "causal_lm":
        raise TypeError(f"generate needs a causal LM; got {type(model).__name__}. Load the model "
                        "with task='causal_lm'.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"{temperature}, {top_p}, {top_k}")
    if isinstance(inputs, str):
        inputs = [inputs]
    if len(inputs) and isinstance(inputs[0], str):
        if tokenizer is None:
            raise ValueError("generate: string prompts need tokenizer=...")
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in inputs]
    elif attention_mask is not None:
        ids, m = np.asarray(inputs), np.asarray(attention_mask).astype(bool)
        rows = [list(r[mr]) for r, mr in zip(ids, m)]
    else:
        rows = [list(map(int, r)) for r in inputs]
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    eos = np.asarray([-1] if eos_token_id is None else np.atleast_1d(eos_token_id), np.int32)
    if pad_token_id is None:
        pad_token_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id
                        is not None else int(eos[0]) if eos[0] >= 0 else 0)
    ids, mask = _left_pad(rows, pad_token_id, bucket)
    limit = _max_positions(model.config)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.shape[1]} tokens after padding) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's {limit} positions.")
    graphdef, state = nnx.split(model)
    tokens, lengths = _generate(
        graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
        rng if rng is not None else jax.random.key(0), jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p), jnp.asarray(eos), jnp.int32(pad_token_id),
        None if task_ids is None else jnp.asarray(task_ids, jnp.int32), max_new_tokens=max_new_tokens, greedy=temperature == 0.0, top_k=int(top_k))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens, lengths)]
    return Generation(tokens=tokens, lengths=lengths, texts=texts)


def _max_positions(cfg) -> int | None:
    return getattr(cfg, "n_positions", None)  # learned position tables cannot extrapolate
