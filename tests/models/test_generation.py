"""KV cache, generation and the tuner extension points, checked against transformers and
against the model's own uncached forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

import peftjax
from peftjax.models import ExtraKV, from_pretrained
from peftjax.models._attention import dot_product_attention
from tests.conftest import batch


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2", "gemma2"])
def test_greedy_generation_equals_transformers(tiny_dir, arch):
    path = tiny_dir(arch)
    hf = T.AutoModelForCausalLM.from_pretrained(path).eval()
    model = from_pretrained(path, progress=False)
    prompts = [[5, 17, 42, 99, 7, 3, 120, 66, 12], [8, 150, 33, 4]]  # different lengths
    n_new = 16
    ids, mask = batch(lengths=[len(p) for p in prompts], left=True)
    for i, p in enumerate(prompts):
        ids[i, ids.shape[1] - len(p):] = p
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                          pad_token_id=0)[:, ids.shape[1]:].numpy()
    got = peftjax.generate(model, prompts, max_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(got.tokens, ref)
    assert got.lengths.tolist() == [n_new, n_new]
    # EOS handling: stop at a token that greedy decoding produces, per sequence
    stop = int(ref[0, 5])
    got = peftjax.generate(model, prompts, max_new_tokens=n_new, eos_token_id=stop, pad_token_id=0)
    for row, row_ref, n in zip(got.tokens, ref, got.lengths):
        hits = np.flatnonzero(row_ref == stop)
        expect = hits[0] + 1 if len(hits) else n_new
        assert n == expect
        np.testing.assert_array_equal(row[:n], row_ref[:n])
        assert (row[n:] == 0).all()


def test_generate_compiles_once_per_bucket(tiny_dir, monkeypatch):
    """Counts traces (Python runs only when jit traces), which is what a recompile costs."""
    from peftjax import generation
    traces, original = [], generation._generate.__wrapped__

    def counting(*args, **kwargs):
        traces.append(args[2].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "_generate", jax.jit(
        counting, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k")))
    model = from_pretrained(tiny_dir("llama"), progress=False)
    for prompt in ([5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [9], [4] * 13):
        peftjax.generate(model, [prompt], max_new_tokens=4, bucket=16)  # all in the 16 bucket
    assert traces == [(1, 16)]
    peftjax.generate(model, [[1] * 20], max_new_tokens=4, bucket=16)  # the 32 bucket
    assert traces == [(1, 16), (1, 32)]


def test_sampling_respects_top_k_and_is_seeded(tiny_dir):
    model = from_pretrained(tiny_dir("llama"), progress=False)
    prompt = [[5, 17, 42, 99]]
    a = peftjax.generate(model, prompt, max_new_tokens=8, temperature=1.0, top_k=1,
                         rng=jax.random.key(1))
    greedy = peftjax.generate(model, prompt, max_new_tokens=8)
    np.testing.assert_array_equal(a.tokens, greedy.tokens)  # top_k=1 is greedy
    b1 = peftjax.generate(model, prompt, max_new_tokens=8, temperature=1.5, rng=jax.random.key(3))
    b2 = peftjax.generate(model, prompt, max_new_tokens=8, temperature=1.5, rng=jax.random.key(3))
    np.testing.assert_array_equal(b1.tokens, b2.tokens)
    with pytest.raises(ValueError, match="top_p"):
        peftjax.generate(model, prompt, top_p=0.0)


def test_generate_rejects_non_lm(tiny_dir):
    model = from_pretrained(tiny_dir("bert", "features"), task="features", progress=False)
    with pytest.raises(TypeError, match="causal LM"):
        peftjax.generate(model, [[1, 2]])


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "gpt2"])
def test_cached_decoding_equals_full_forward(tiny_dir, arch):
    """Prefill 6 tokens, then feed 4 one at a time: logits equal the uncached pass (sliding
    windows of 5 are crossed, left padding included)."""
    model = from_pretrained(tiny_dir(arch), progress=False)
    ids, mask = batch(lengths=(10, 7), left=True)
    full = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    cache = model.init_cache(2, 12)
    m = np.zeros((2, 12), np.int32)
    m[:, :6] = mask[:, :6]
    out = model(jnp.asarray(ids[:, :6]), attention_mask=jnp.asarray(m), cache=cache)
    steps = [out.logits]
    for t in range(6, 10):
        m[:, t] = mask[:, t]
        out = model(jnp.asarray(ids[:, t:t + 1]), attention_mask=jnp.asarray(m), cache=out.cache)
        steps.append(out.logits)
    inc = np.concatenate([np.asarray(s) for s in steps], axis=1)
    real = mask.astype(bool)
    assert np.abs(inc - np.asarray(full))[real].max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_inputs_embeds_equal_input_ids(tiny_dir, arch):
    model = from_pretrained(tiny_dir(arch), progress=False)
    ids, mask = batch()
    emb = model.model.embed_tokens(jnp.asarray(ids))
    if model.config.embed_scale is not None:  # Gemma scales ids' embeddings only, as HF does
        emb = emb * model.config.embed_scale
    a = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    b = model(inputs_embeds=emb, attention_mask=jnp.asarray(mask)).logits
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_extra_kv_prefix_equals_cached_prefix(tiny_dir, arch):
    """Prefix tuning's contract: keys/values of a prefix passed as ExtraKV give the same
    logits as running the prefix tokens first with a cache."""
    model = from_pretrained(tiny_dir(arch), progress=False)
    P, N = 4, 6
    ids, _ = batch(lengths=(P + N, P + N))
    full = np.asarray(model(jnp.asarray(ids)).logits)[:, P:]
    out = model(jnp.asarray(ids[:, :P]), cache=model.init_cache(2, P))
    extra = [ExtraKV(k, v) for k, v in zip(out.cache.k, out.cache.v)]
    pos = jnp.broadcast_to(jnp.arange(P, P + N), (2, N))
    got = np.asarray(model(jnp.asarray(ids[:, P:]), positions=pos, extra_kv=extra).logits)
    assert np.abs(got - full).max() <= 1e-5


def test_extra_kv_gate_is_separate_softmax_scaled_by_gate():
    """LLaMA-Adapter's form: out = attn(q, k, v) + gate * softmax(q k_p^T * s) v_p; gate 0 is
    the identity."""
    rs = np.random.RandomState(0)
    B, T, H, K, D, P = 2, 5, 4, 2, 8, 3
    q, k, v = (jnp.asarray(rs.randn(*s), jnp.float32) for s in
               [(B, T, H, D), (B, T, K, D), (B, T, K, D)])
    kp, vp = (jnp.asarray(rs.randn(1, P, K, D), jnp.float32) for _ in range(2))
    gate = jnp.asarray(rs.randn(H), jnp.float32)
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    base = dot_product_attention(q, k, v, mask, scale=D ** -0.5)
    zero = dot_product_attention(q, k, v, mask, scale=D ** -0.5, extra=ExtraKV(kp, vp, jnp.zeros(H)))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(zero))
    got = dot_product_attention(q, k, v, mask, scale=D ** -0.5, extra=ExtraKV(kp, vp, gate))
    kv_of_head = np.arange(H) // (H // K)
    qn, kpn, vpn = np.asarray(q), np.asarray(kp)[0], np.asarray(vp)[0]
    s = np.einsum("bthd,phd->bhtp", qn, kpn[:, kv_of_head]) * D ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    add = np.einsum("bhtp,phd->bthd", p, vpn[:, kv_of_head]) * np.asarray(gate)[None, None, :, None]
    np.testing.assert_allclose(np.asarray(got), np.asarray(base) + add, atol=1e-5)
