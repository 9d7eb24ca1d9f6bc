"""The attention module: the XLA path against a float64 numpy reference, and the choice of
implementation (cuDNN on GPUs) checked on CPU: what is chosen for which call, and that the
arguments handed to ``jax.nn.dot_product_attention`` mean our mask (run through jax's own XLA
implementation of that function)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax.models import _attention as A
from peftjax.models import from_pretrained


def reference(q, k, v, mask, *, scale, softcap=None, prefix=None, gated=None):
    """Per-head float64 attention: [B, T, H, D] from numpy arrays."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    head_kv = np.arange(H) // (H // k.shape[2])
    k, v = k[:, :, head_kv], v[:, :, head_kv]
    mask = np.asarray(mask)

    @np.errstate(invalid="ignore")  # a row that sees no key is NaN here (not compared)
    def attend(keys, values, m):
        s = np.einsum("bthd,bshd->bhts", q, keys) * scale
        if softcap is not None:
            s = np.tanh(s / softcap) * softcap
        s = np.where(m[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.where(m[:, None], p, 0.0)
        return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), values)

    if prefix is not None:
        pk, pv = (np.broadcast_to(np.asarray(a, np.float64)[:, :, head_kv],
                                  (B, a.shape[1], H, D)) for a in prefix)
        k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
        mask = np.concatenate([np.ones(mask.shape[:2] + (pk.shape[1],), bool), mask], -1)
    out = attend(k, v, mask)
    if gated is not None:
        gk, gv, gate = (np.asarray(a, np.float64) for a in gated)
        gk, gv = (np.broadcast_to(a[:, :, head_kv], (B,) + a.shape[1:2] + (H, D)) for a in (gk, gv))
        out = out + attend(gk, gv, np.ones((B, T, gk.shape[1]), bool)) * gate[None, None, :, None]
    return out


def random_case(seed, B=2, T=6, S=6, H=6, K=2, D=8, P=3):
    rs = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(rs.randn(*shape), jnp.float32)
               for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, D)))
    mask = rs.rand(B, T, S) > 0.3
    mask[:, :, 0] = True  # every query sees a key (the reference has no uniform fallback)
    extra_k, extra_v = (jnp.asarray(rs.randn(1, P, K, D), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(mask), extra_k, extra_v, jnp.asarray(rs.randn(H), jnp.float32)


@pytest.mark.parametrize("kind", ["plain", "mha", "mqa", "softcap", "prefix", "gated"])
def test_xla_path_matches_float64_reference(kind):
    shape = dict(mha=dict(K=6), mqa=dict(K=1)).get(kind, {})
    q, k, v, mask, ek, ev, gate = random_case(1, **shape)
    kw, ref_kw = dict(scale=0.4), dict(scale=0.4)
    if kind == "softcap":
        kw["softcap"] = ref_kw["softcap"] = 1.5
    if kind == "prefix":
        kw["extra"], ref_kw["prefix"] = A.ExtraKV(k=ek, v=ev), (ek, ev)
    if kind == "gated":
        kw["extra"], ref_kw["gated"] = A.ExtraKV(k=ek, v=ev, gate=gate), (ek, ev, gate)
    got = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, mask, **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), reference(q, k, v, mask, **ref_kw),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("T, blocks", [(96, 1), (128, 2), (256, 4), (320, 5), (1024, 8)])
def test_causal_blocks_give_full_attention(T, blocks):
    """Causal self-attention cut into query blocks (each seeing the keys up to its end) equals
    attention over all keys for every query that sees a key, values and gradients; the one row
    that sees none (left padding) stays finite."""
    assert A.causal_blocks(T, causal=True) == blocks and A.causal_blocks(T, causal=False) == 1
    if T == 1024:
        return
    rs = np.random.RandomState(T)
    B, H, K, D = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rs.randn(B, T, h, D), jnp.float32) for h in (H, K, K))
    valid = np.ones((B, T), bool)
    valid[0, :10] = False  # left padding
    valid[1, T - 20:] = False  # right padding
    mask_np = np.tril(np.ones((T, T), bool))[None] & valid[:, None, :]
    mask = jnp.asarray(mask_np)
    sees = jnp.asarray(mask_np.any(-1))[:, :, None, None]

    def loss(q, k, v, causal):
        out = A.dot_product_attention(q, k, v, mask, scale=0.3, causal=causal)
        return jnp.sum(jnp.where(sees, jnp.sin(out), 0.0)), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (gq, gk, gv), out = grad(q, k, v, True)
    (wq, wk, wv), _ = grad(q, k, v, False)
    assert np.isfinite(np.asarray(out)).all()
    rows = np.asarray(sees)[..., 0, 0]
    want = reference(q, k, v, mask_np, scale=0.3)
    np.testing.assert_allclose(np.asarray(out)[rows], want[rows], atol=2e-6, rtol=1e-5)
    for g, w in ((gq, wq), (gk, wk), (gv, wv)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)


def test_padding_row_is_uniform_not_nan():
    q, k, v, mask, *_ = random_case(2)
    mask = mask.at[0, 2].set(False)  # query 2 of row 0 sees no key
    out = A.dot_product_attention(q, k, v, mask, scale=0.4)
    np.testing.assert_allclose(np.asarray(out[0, 2]),
                               np.repeat(np.asarray(v[0]).mean(0), 3, axis=0), atol=1e-6)


def test_setting_validated_and_restored(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*auto, xla"):
        peftjax.set_attention_implementation("flash")
    previous = peftjax.set_attention_implementation("xla")
    assert A.attention_implementation() == "xla"
    assert peftjax.set_attention_implementation(previous) == "xla"
    monkeypatch.setattr(A, "_implementation", [])
    monkeypatch.setenv("PEFTJAX_ATTENTION", "cuda")
    with pytest.raises(ValueError, match="PEFTJAX_ATTENTION: unknown attention implementation"):
        A.attention_implementation()
    monkeypatch.setenv("PEFTJAX_ATTENTION", "xla")
    assert A.attention_implementation() == "xla"


def test_cudnn_asked_for_on_cpu_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(A, "_implementation", ["cudnn"])
    q, k, v, mask, *_ = random_case(3)
    with pytest.raises(ValueError, match="'cudnn' cannot run this call: the backend is cpu"):
        A.dot_product_attention(q, k, v, mask, scale=0.4)
    monkeypatch.setattr(A, "_implementation", ["auto"])  # auto on CPU: the XLA path, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.dot_product_attention(q, k, v, mask, scale=0.4)


@pytest.fixture
def on_fake_gpu(monkeypatch):
    """jax.default_backend() says gpu; jax.nn.dot_product_attention's cuDNN implementation is
    replaced by jax's XLA implementation of the same call (recording the arguments), so the
    arguments we pass must mean our mask for the outputs to agree."""
    calls = []
    real = jax.nn.dot_product_attention

    def fake(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        calls.append(kwargs)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(A.jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(A, "_implementation", ["auto"])
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_call_means_our_mask(on_fake_gpu, causal):
    q, k, v, mask, ek, ev, gate = random_case(4, T=8, S=8)
    if causal:
        mask = mask & jnp.tril(jnp.ones((8, 8), bool))
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    extra = A.ExtraKV(k=ek.astype(jnp.bfloat16), v=ev.astype(jnp.bfloat16), gate=gate)
    for kw in (dict(), dict(extra=extra)):  # LLaMA-Adapter's gated term joins afterwards
        got = A.dot_product_attention(q, k, v, mask, scale=0.4, causal=causal, **kw)
        assert on_fake_gpu and on_fake_gpu[-1]["is_causal"] is causal
        assert on_fake_gpu[-1]["mask"].shape == (2, 1, 8, 8)
        A.set_attention_implementation("xla")
        want = A.dot_product_attention(q, k, v, mask, scale=0.4, **kw)
        A.set_attention_implementation("auto")
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=2e-2)  # bfloat16 outputs of two summation orders


def test_cudnn_not_used_where_it_does_not_apply(on_fake_gpu):
    q, k, v, mask, ek, ev, _ = random_case(5)
    bf = lambda a: a.astype(jnp.bfloat16)  # noqa: E731
    A.dot_product_attention(q, k, v, mask, scale=0.4)  # float32 compute
    A.dot_product_attention(bf(q), bf(k), bf(v), mask, scale=0.4, softcap=2.0)
    A.dot_product_attention(bf(q), bf(k), bf(v), mask, scale=0.4,
                            extra=A.ExtraKV(k=bf(ek), v=bf(ev)))  # prefix keys in the softmax
    A.dot_product_attention(bf(q), bf(k), bf(v), mask, scale=0.4, dropout_rate=0.1,
                            dropout_rng=jax.random.key(0))
    with A.shifted_sparse_attention(1 / 3):  # LongLoRA's training context
        A.dot_product_attention(bf(q), bf(k), bf(v), mask, scale=0.4)
    assert on_fake_gpu == []
    A.set_attention_implementation("cudnn")
    try:
        with pytest.raises(ValueError, match="it has no attention soft-capping"):
            A.dot_product_attention(bf(q), bf(k), bf(v), mask, scale=0.4, softcap=2.0)
    finally:
        A.set_attention_implementation("auto")


def test_cudnn_refusal_falls_back_with_one_warning(monkeypatch, on_fake_gpu):
    def refuse(*args, **kwargs):
        raise NotImplementedError("The head dim must be <= 128 and a multiple of 8, but got 12.")

    monkeypatch.setattr(A.jax.nn, "dot_product_attention", refuse)
    monkeypatch.setattr(A, "_warned", set())
    q, k, v, mask, *_ = random_case(6, D=12)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    with pytest.warns(UserWarning, match="falls back to the XLA path: cuDNN refused it: The head"):
        got = A.dot_product_attention(q, k, v, mask, scale=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        A.dot_product_attention(q, k, v, mask, scale=0.4)
    A.set_attention_implementation("xla")
    want = A.dot_product_attention(q, k, v, mask, scale=0.4)
    A.set_attention_implementation("auto")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an "
                    "NVIDIA GPU; on CPU the arguments are checked by test_cudnn_call_means_our_mask")
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_matches_xla_on_gpu(causal):
    """On a GPU: cuDNN's outputs and gradients against the xla path's, bfloat16, GQA, padding."""
    rs = np.random.RandomState(8)
    B, T, H, K, D = 2, 256, 8, 2, 64
    q, k, v = (jnp.asarray(rs.randn(B, T, h, D), jnp.bfloat16) for h in (H, K, K))
    valid = np.ones((B, T), bool)
    valid[1, T - 40:] = False
    mask = np.tril(np.ones((T, T), bool))[None] if causal else np.ones((1, T, T), bool)
    mask = jnp.asarray(mask & valid[:, None, :])

    def run(implementation):
        previous = A.set_attention_implementation(implementation)
        try:
            f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(A.dot_product_attention(
                q, k, v, mask, scale=D ** -0.5, causal=causal).astype(jnp.float32) ** 2),
                argnums=(0, 1, 2)))
            return f(q, k, v), f.lower(q, k, v).as_text()
        finally:
            A.set_attention_implementation(previous)

    (got, got_grads), hlo = run("cudnn")
    assert "cudnn" in hlo.lower()
    (want, want_grads), _ = run("xla")
    np.testing.assert_allclose(float(got), float(want), rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.max(np.abs(g - w)) <= 0.05 * np.max(np.abs(w))


def _padded_causal(T, B=2, window=None, left=24, right=40):
    valid = np.ones((B, T), bool)
    valid[0, :left] = False  # left padding
    valid[1, T - right:] = False  # right padding
    slots = np.arange(T)
    mask = (slots[None, :] <= slots[:, None])[None] & valid[:, None, :]
    if window is not None:
        mask = mask & (slots[None, :] > slots[:, None] - window)[None]
    return jnp.asarray(mask), valid


@pytest.fixture
def splash(monkeypatch):
    """The splash kernel asked for explicitly: off a TPU it runs in Pallas interpret mode."""
    monkeypatch.setattr(A, "_implementation", ["splash"])
    monkeypatch.setattr(A, "SPLASH_BLOCKS", (128,))  # several blocks at test lengths


@pytest.mark.parametrize("window, softcap, grads", [(None, None, True), (50, None, True),
                                                    (None, 5.0, False)])
def test_splash_kernel_matches_xla(splash, window, softcap, grads):
    """The splash kernel (interpret mode) against the xla path on every real token: GQA,
    left and right padding (as segment ids), a sliding window, soft-capping; values and the
    gradients of q, k and v (measured: values within 2.4e-7, gradients of size ~8 within
    2.3e-6)."""
    rs = np.random.RandomState(9)
    B, T, H, K, D = 2, 256, 4, 2, 16
    q, k, v = (jnp.asarray(rs.randn(B, T, h, D), jnp.float32) for h in (H, K, K))
    mask, valid = _padded_causal(T, B, window)
    weights = jnp.asarray(rs.randn(B, T, H, D), jnp.float32) * valid[:, :, None, None]

    def loss(q, k, v, implementation):
        A.set_attention_implementation(implementation)
        out = A.dot_product_attention(q, k, v, mask, scale=D ** -0.5, softcap=softcap,
                                      causal=True, window=window)
        return jnp.sum(out * weights), out

    run = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True) if grads else loss
    got = run(q, k, v, "splash")
    want = run(q, k, v, "xla")
    (got_out, want_out) = (got[0][1], want[0][1]) if grads else (got[1], want[1])
    real = valid[:, :, None, None] & np.ones((1, 1, H, D), bool)
    np.testing.assert_allclose(np.asarray(got_out)[real], np.asarray(want_out)[real],
                               atol=1e-6, rtol=0)
    if grads:
        for g, w in zip(got[1], want[1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)


def test_splash_asked_for_where_it_cannot_run_names_the_reason(splash):
    q, k, v, *_ = random_case(10, T=128, S=128, D=16)
    mask, _ = _padded_causal(128)
    cases = [(dict(causal=False), "causal self-attention only"),
             (dict(causal=True, dropout_rate=0.1, dropout_rng=jax.random.key(0)),
              "attention dropout"),
             (dict(causal=True, extra=A.ExtraKV(k=k[:1, :3], v=v[:1, :3])), "prefix keys")]
    for kw, reason in cases:
        with pytest.raises(ValueError, match=f"'splash' cannot run this call: .*{reason}"):
            A.dot_product_attention(q, k, v, mask, scale=0.4, **kw)
    q, k, v, *_ = random_case(10, T=96, S=96, D=16)
    with pytest.raises(ValueError, match="sequence length 96 is not a multiple of 128"):
        A.dot_product_attention(q, k, v, _padded_causal(96)[0], scale=0.4, causal=True)


def test_auto_on_a_tpu_picks_splash_where_it_applies(monkeypatch):
    """``auto`` with the backend saying tpu: causal self-attention goes to the splash kernel,
    the rest to xla silently; several devices without a mesh are refused by the kernel and
    fall back to xla with one warning."""
    calls = []
    real = A._splash_attention

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        with monkeypatch.context() as m:  # run the real kernel in interpret mode
            m.setattr(A.jax, "default_backend", lambda: "cpu")
            return real(*args, **kwargs)

    monkeypatch.setattr(A, "_implementation", ["auto"])
    monkeypatch.setattr(A.jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(A, "_splash_attention", recorded)
    monkeypatch.setattr(A, "_warned", set())
    q, k, v, *_ = random_case(11, T=128, S=128, D=16)
    mask, valid = _padded_causal(128, window=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = A.dot_product_attention(q, k, v, mask, scale=0.4, causal=True, window=7)
        assert len(calls) == 1 and calls[0]["window"] == 7
        A.dot_product_attention(q, k, v, mask, scale=0.4)  # not causal: xla, no warning
        A.dot_product_attention(q[:, :96], k[:, :96], v[:, :96], mask[:, :96, :96], scale=0.4,
                                causal=True)  # 96 tokens: xla, no warning
        assert len(calls) == 1
    monkeypatch.setattr(A.jax, "device_count", lambda: 8)  # and no mesh set: refused
    with pytest.warns(UserWarning, match="splash refused it: there are several devices"):
        fallback = A.dot_product_attention(q, k, v, mask, scale=0.4, causal=True, window=7)
    A.set_attention_implementation("xla")
    want = A.dot_product_attention(q, k, v, mask, scale=0.4, causal=True, window=7)
    np.testing.assert_array_equal(np.asarray(fallback), np.asarray(want))
    real = np.asarray(valid)[:, :, None, None] & np.ones(got.shape, bool)
    # (measured: 1.4e-6 at most; scale 0.4 gives larger scores than the other tests')
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=5e-6,
                               rtol=0)


def test_splash_in_a_model_with_windows_and_softcap(splash, tiny_dir):
    """Gemma 2 (sliding-window and global layers, soft-capping, GQA) with the splash kernel
    gives the xla path's logits on every real token, with left padding: the window reaches
    the kernel from the model (measured: 3.5e-6 on logits of size ~3)."""
    model = from_pretrained(tiny_dir("gemma2"), progress=False)
    rs = np.random.RandomState(12)
    ids = jnp.asarray(rs.randint(1, 160, (2, 128)), jnp.int32)
    attn = jnp.asarray(np.arange(128)[None] >= np.array([[0], [30]]), jnp.int32)
    got = model(ids, attention_mask=attn).logits
    A.set_attention_implementation("xla")
    want = model(ids, attention_mask=attn).logits
    real = np.asarray(attn, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5,
                               rtol=0)


def _splash_on_eight_devices():
    """(In a process with 8 CPU devices.) The splash kernel under shard_map over a data 2 x
    fsdp 2 x tensor 2 mesh set while tracing (batch over data and fsdp, heads over tensor)
    equals the xla path, values and gradients (measured: loss 1e-7 relative, gradients within
    2.4e-6); without a mesh it names the fix."""
    from jax.sharding import NamedSharding, PartitionSpec

    from peftjax.train import MeshConfig, make_mesh
    A.SPLASH_BLOCKS = (128,)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    rs = np.random.RandomState(13)
    B, T, H, K, D = 4, 256, 4, 2, 16
    mask, valid = _padded_causal(T, B, 40)
    q, k, v = (jax.device_put(jnp.asarray(rs.randn(B, T, h, D), jnp.float32),
                              NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
               for h in (H, K, K))
    weights = jnp.asarray(rs.randn(B, T, H, D), jnp.float32) * valid[:, :, None, None]

    def run(implementation):
        A.set_attention_implementation(implementation)
        f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(A.dot_product_attention(
            q, k, v, mask, scale=D ** -0.5, causal=True, window=40) * weights),
            argnums=(0, 1, 2)))
        with jax.set_mesh(mesh):
            return f(q, k, v), f.lower(q, k, v).as_text()

    (got, got_grads), text = run("splash")
    (want, want_grads), xla_text = run("xla")
    assert "manual" in text and "manual" not in xla_text  # the kernel ran under shard_map
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=0)
    A.set_attention_implementation("splash")
    with pytest.raises(ValueError, match="no mesh is set while the call is traced"):
        jax.jit(lambda q: A.dot_product_attention(q, k, v, mask, scale=0.3, causal=True))(q)


def test_splash_kernel_sharded_over_a_mesh():
    from tests.conftest import on_eight_devices
    on_eight_devices("from tests.models.test_attention import _splash_on_eight_devices; "
                     "_splash_on_eight_devices()")
