"""LoRA against PyTorch PEFT: which modules are adapted with which r/scaling, the trainable
counts, the forward pass with non-zero adapters, merging; plus identity at init and errors."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from peftjax import LoraConfig, count_parameters, get_peft_model
from peftjax.models import from_pretrained
from peftjax.tuners import LoraParam, is_lora_layer
from peftjax.tuners._targets import get_submodule
from tests.conftest import batch, hf_class, hf_positions, train_briefly


def _inputs(arch):
    ids, mask = batch(lengths=(10, 6))
    return ids, mask


def _ours_logits(model, arch, ids, mask):
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out.hidden_states if arch in ("bert",) else out.logits)


def _hf_logits(model, arch, ids, mask):
    kw = {} if arch == "bert" else {"position_ids": torch.tensor(hf_positions(mask))}
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    return (out.last_hidden_state if arch == "bert" else out.logits).numpy()


def _task(arch):
    return "features" if arch == "bert" else "causal_lm"


def _torch_peft(path, arch, cfg: dict, seed=0):
    hf = hf_class(arch, _task(arch)).from_pretrained(path).eval()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(**cfg))
    return pm.eval()


def _copy_from_torch(pm, ours):
    """Copies PEFT's lora_A/lora_B into our layers (transposed to our [in, r] / [r, out])."""
    n = 0
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            layer = get_submodule(ours.base_model, name)
            f = layer.lora["default"]
            f.lora_A[...] = jnp.asarray(mod.lora_A["default"].weight.detach().numpy().T)
            f.lora_B[...] = jnp.asarray(mod.lora_B["default"].weight.detach().numpy().T)
            n += 1
    return n


def _torch_lora_layers(pm):
    return {name: (mod.r["default"], mod.scaling["default"])
            for name, mod in pm.base_model.model.named_modules()
            if hasattr(mod, "r") and isinstance(mod.r, dict) and "default" in mod.r}


CONFIGS = {
    "default_targets": dict(r=4, lora_alpha=8),
    "list": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]),
    "regex": dict(r=2, lora_alpha=4, target_modules=r".*\.(1|2)\.self_attn\.(q|o)_proj"),
    "all_linear_rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "layers_patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                            layers_to_transform=[0, 2], layers_pattern="layers",
                            rank_pattern={"v_proj": 2, r"layers\.2\.self_attn\.q_proj": 6},
                            alpha_pattern={"up_proj": 3.0}),
    "exclude": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    exclude_modules=["model.layers.1.self_attn.v_proj"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_layers_rank_scaling_counts_and_outputs_as_peft(tiny_dir, name):
    arch = "llama"
    path = tiny_dir(arch)
    cfg = CONFIGS[name]
    pm = _torch_peft(path, arch, {**cfg, "init_lora_weights": False})
    ours = get_peft_model(from_pretrained(path, progress=False), LoraConfig(**cfg),
                          rngs=nnx.Rngs(0))
    theirs = _torch_lora_layers(pm)
    mine = {n: (m.lora["default"].r, m.lora["default"].scaling)
            for n, m in ours.lora_layers()}
    assert sorted(mine) == sorted(theirs)
    for n in mine:
        assert mine[n][0] == theirs[n][0] and mine[n][1] == pytest.approx(theirs[n][1], rel=1e-12)
    trainable, total = count_parameters(ours)
    assert (trainable, total) == pm.get_nb_trainable_parameters()
    # non-zero adapters (PEFT's random A and B) give the same logits
    assert _copy_from_torch(pm, ours) == len(mine)
    ids, mask = _inputs(arch)
    got, want = _ours_logits(ours, arch, ids, mask), _hf_logits(pm, arch, ids, mask)
    base = _hf_logits(hf_class(arch, "causal_lm").from_pretrained(path).eval(), arch, ids, mask)
    real = mask.astype(bool)
    assert np.abs(want - base)[real].max() > 1e-2  # the adapter really changes the output
    assert np.abs(got - want)[real].max() <= 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "bert", "gemma2", "qwen2"])
def test_default_targets_and_outputs_other_architectures(tiny_dir, arch):
    path = tiny_dir(arch, _task(arch))
    pm = _torch_peft(path, arch, dict(r=4, lora_alpha=8, init_lora_weights=False,
                                      **({"fan_in_fan_out": True} if arch == "gpt2" else {})))
    ours = get_peft_model(from_pretrained(path, task=_task(arch), progress=False),
                          LoraConfig(r=4, lora_alpha=8), rngs=nnx.Rngs(0))
    assert sorted(n for n, _ in ours.lora_layers()) == sorted(_torch_lora_layers(pm))
    assert count_parameters(ours) == pm.get_nb_trainable_parameters()
    _copy_from_torch(pm, ours)
    ids, mask = _inputs(arch)
    real = mask.astype(bool)
    diff = np.abs(_ours_logits(ours, arch, ids, mask) - _hf_logits(pm, arch, ids, mask))[real]
    assert diff.max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_identity_right_after_injection(tiny_dir, arch):
    path = tiny_dir(arch, _task(arch))
    base = from_pretrained(path, task=_task(arch), progress=False)
    ids, mask = _inputs(arch)
    before = _ours_logits(base, arch, ids, mask)
    for init in (True, "gaussian"):
        model = get_peft_model(from_pretrained(path, task=_task(arch), progress=False),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init,
                                          lora_dropout=0.1), rngs=nnx.Rngs(1))
        layer = model.lora_layers()[0][1]
        a = np.asarray(layer.lora["default"].lora_A[...])
        assert np.abs(a).max() > 0 and not np.asarray(layer.lora["default"].lora_B[...]).any()
        if init is True:  # kaiming-uniform(a=sqrt(5)) on [r, in] has bound 1/sqrt(in)
            assert np.abs(a).max() <= 1 / np.sqrt(layer.in_features)
        np.testing.assert_array_equal(_ours_logits(model, arch, ids, mask), before)


def test_merge_unmerge_and_merge_and_unload_match_peft(tiny_dir):
    path = tiny_dir("llama")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
               use_rslora=True)
    pm = _torch_peft(path, "llama", {**cfg, "init_lora_weights": False})
    ours = get_peft_model(from_pretrained(path, progress=False), LoraConfig(**cfg),
                          rngs=nnx.Rngs(0))
    _copy_from_torch(pm, ours)
    ids, mask = _inputs("llama")
    real = mask.astype(bool)
    # Merging changes the rounding path (one GEMM instead of two). PEFT's own merge moves
    # the logits by ~7e-6 on this adapter (init_lora_weights=False: B ~ U(+-0.5), far larger
    # than trained adapters); XLA:CPU's f32 GEMM rounds about 2x torch's (see
    # tests/models/test_real_models.py), so outputs may move by max(1e-5, 2x PEFT's own).
    before = _hf_logits(pm, "llama", ids, mask)
    pm.merge_adapter()
    peft_gap = np.abs(_hf_logits(pm, "llama", ids, mask) - before)[real].max()
    pm.unmerge_adapter()
    tol = max(1e-5, 2 * peft_gap)
    unmerged = _ours_logits(ours, "llama", ids, mask)
    kernel0 = np.asarray(ours.base_model.model.layers[0].self_attn.q_proj.kernel[...]).copy()
    ours.merge_adapter()
    gap = np.abs(_ours_logits(ours, "llama", ids, mask) - unmerged)[real].max()
    print(f"merged vs unmerged: peftjax {gap:.2e}, PEFT {peft_gap:.2e}")
    assert gap <= tol
    ours.unmerge_adapter()
    restored = np.asarray(ours.base_model.model.layers[0].self_attn.q_proj.kernel[...])
    assert np.abs(restored - kernel0).max() <= 1e-6
    merged_torch = pm.merge_and_unload()
    plain = ours.merge_and_unload()
    assert not any(is_lora_layer(m) for _, m in nnx.iter_graph(plain))
    assert not list(nnx.to_flat_state(nnx.state(plain, LoraParam)))
    assert np.abs(_ours_logits(plain, "llama", ids, mask) - unmerged)[real].max() <= tol
    # unload() without merging gives back the original weights, bit for bit
    fresh = from_pretrained(path, progress=False)
    k_orig = np.asarray(fresh.model.layers[1].mlp.gate_proj.kernel[...]).copy()
    again = get_peft_model(fresh, LoraConfig(**cfg, init_lora_weights=False), rngs=nnx.Rngs(5))
    restored = again.unload()
    assert not list(nnx.to_flat_state(nnx.state(restored, LoraParam)))
    np.testing.assert_array_equal(np.asarray(restored.model.layers[1].mlp.gate_proj.kernel[...]),
                                  k_orig)
    sd = merged_torch.state_dict()
    for i, layer in enumerate(plain.model.layers):
        for proj in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj"):
            mine = np.asarray(get_submodule(layer, proj).kernel[...]).T
            theirs = sd[f"model.layers.{i}.{proj}.weight"].numpy()
            assert np.abs(mine - theirs).max() <= 1e-5


def test_lora_dropout_only_with_a_dropout_key(tiny_dir):
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False),
                           rngs=nnx.Rngs(0))
    ids, mask = _inputs("llama")
    a = _ours_logits(model, "llama", ids, mask)
    np.testing.assert_array_equal(a, _ours_logits(model, "llama", ids, mask))
    fwd = nnx.jit(lambda m, ids, mask, rng: m(ids, attention_mask=mask, dropout_rng=rng).logits)
    call = lambda ids, mask, rng: fwd(model, ids, mask, rng)  # noqa: E731
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    b, b_again, c = (np.asarray(call(ids, mask, jax.random.key(k))) for k in (1, 1, 2))
    assert np.abs(a - b).max() > 1e-3             # dropout changed the LoRA branch
    np.testing.assert_array_equal(b, b_again)     # a key fixes the mask
    assert np.abs(b - c).max() > 1e-3             # another key, another mask
    # only the LoRA input is dropped: zeroing B removes every difference
    for _, layer in model.lora_layers():
        f = layer.lora["default"]
        f.lora_B[...] = jnp.zeros_like(f.lora_B[...])
    np.testing.assert_allclose(np.asarray(call(ids, mask, jax.random.key(1))),
                               _ours_logits(model, "llama", ids, mask), rtol=0, atol=1e-6)


def test_trainable_mask_modules_to_save_and_bias(tiny_dir):
    path = tiny_dir("qwen2", "sequence_classification")
    model = get_peft_model(
        from_pretrained(path, task="sequence_classification", progress=False),
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"], bias="lora_only"),
        rngs=nnx.Rngs(0))
    mask = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(model.trainable_mask())}
    on = sorted(k.removeprefix("base_model.") for k, v in mask.items() if v)
    assert all(k.startswith("base_model.") for k in mask)  # over the PeftModel's whole state
    assert "score.kernel" in on
    assert "model.layers.0.self_attn.q_proj.bias" in on          # bias of an adapted layer
    assert "model.layers.0.self_attn.k_proj.bias" not in on      # not adapted
    assert all(k.endswith(("lora_A", "lora_B", "bias")) or k == "score.kernel" for k in on)
    n_lora = sum(1 for k in on if k.endswith(("lora_A", "lora_B")))
    assert n_lora == 2 * 3  # q_proj in 3 layers


def test_bad_configs_are_explained(tiny_dir):
    with pytest.raises(ValueError, match=r"r=0 must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"bias='some' must be one of"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match=r"lora_dropout=1.5 must be in \[0, 1\)"):
        LoraConfig(lora_dropout=1.5)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa'.*not implemented"):
        LoraConfig(init_lora_weights="pissa")
    model = from_pretrained(tiny_dir("llama"), progress=False)
    with pytest.raises(ValueError, match=r"target_modules=\('query',\).*matches no linear layer.*"
                       r"\['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', "
                       r"'up_proj', 'v_proj'\]"):
        get_peft_model(model, LoraConfig(target_modules=["query"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="matches no linear layer"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]),
                       rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_delta_backward_matches_autodiff(dtype):
    """The hand-written backward of (h A) B s equals autodiff of the same expression, for every
    input and for the adapters alone (what training differentiates). Relative to the largest
    gradient: 1e-6 in float32 (measured 8.8e-8); in bf16 one bf16 ulp, 2^-8 (measured 1.4e-3:
    ours accumulates dA/dB in float32, autodiff of the bf16 expression rounds to bf16)."""
    from peftjax.tuners._lora import _lora_delta
    ks = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(ks[0], (2, 5, 8)).astype(dtype)
    a, b = jax.random.normal(ks[1], (8, 3)), jax.random.normal(ks[2], (3, 6))
    w = jax.random.normal(ks[3], (2, 5, 6))

    def ref(h, a, b):
        return (jnp.dot(jnp.dot(h, a.astype(dtype)), b.astype(dtype)) * jnp.asarray(0.5, dtype))

    def loss(f):
        return lambda *args: jnp.sum(jnp.sin(f(*args).astype(jnp.float32)) * w)

    op = _lora_delta(0.5, jnp.dtype(dtype))
    tol = 1e-6 if dtype == jnp.float32 else 2.0 ** -8
    np.testing.assert_array_equal(np.asarray(op(h, a, b)), np.asarray(ref(h, a, b)))
    for argnums in ((0, 1, 2), (1, 2), (0,)):
        got = jax.jit(jax.grad(loss(op), argnums))(h, a, b)
        want = jax.grad(loss(ref), argnums)(h, a, b)
        for g, r, i in zip(got, want, argnums):
            assert g.dtype == (h, a, b)[i].dtype
            err = float(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)).max())
            rel = err / float(jnp.abs(r.astype(jnp.float32)).max())
            print(f"{jnp.dtype(dtype).name} d{'hab'[i]}: relative error {rel:.1e}")
            assert rel <= tol, (argnums, i, rel)


def test_lora_fa_trains_b_only_and_keeps_x_a_not_the_layer_input(tiny_dir):
    """LoRA-FA (``lora_fa=True``): A stays at its initialisation, only B trains (and has
    optimizer state), and the backward pass of an adapted layer keeps ``x A`` [N, r] instead
    of its input ``x`` [N, in]."""
    from jax._src.ad_checkpoint import saved_residuals

    from peftjax.tuners._lora import _lora_delta
    delta = _lora_delta(2.0, jnp.float32)
    h, a, b = jnp.ones((48, 32)), jnp.ones((32, 4)), jnp.ones((4, 16))
    kept = [r[0].shape for r in saved_residuals(lambda h, b: delta(h, a, b).sum(), h, b)]
    assert (48, 32) not in kept and (48, 4) in kept, kept
    kept = [r[0].shape for r in saved_residuals(lambda h, a, b: delta(h, a, b).sum(), h, a, b)]
    assert (48, 32) in kept  # plain LoRA needs the input for dA

    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_fa=True),
                           rngs=nnx.Rngs(0))
    on = {p[-1] for p, v in nnx.to_flat_state(model.trainable_mask()) if v}
    assert on == {"lora_B"}
    factors = [layer.lora["default"] for _, layer in model.lora_layers()]
    a_before = [np.asarray(f.lora_A[...]) for f in factors]
    ids, mask = batch(lengths=(9, 6))
    train_briefly(model, "causal_lm", ids, mask, steps=2)
    assert all(np.array_equal(np.asarray(f.lora_A[...]), a) for f, a in zip(factors, a_before))
    assert all(np.abs(np.asarray(f.lora_B[...])).max() > 0 for f in factors)
    assert "lora_fa" not in model.peft_config.to_peft_dict()  # the file is plain LoRA
