"""DoRA (``LoraConfig(use_dora=True)``) against PyTorch PEFT: PEFT's files (with a trained-looking
magnitude and non-zero B) load here with PEFT's logits, ours load in PEFT, within 1e-4 on Llama,
GPT-2 (Conv1D layout) and BERT; identity at init; merge / unmerge / merge_and_unload; a 4-bit
base; only the magnitude's norm is a constant (its gradient matches autodiff of the formula)."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from peftjax import LoraConfig, PeftModel, get_peft_model
from peftjax.models import from_pretrained
from peftjax.tuners import LoraParam
from tests.conftest import batch, hf_class, train_briefly
from tests.tuners.common import Probe, layer_config, peft_saved

ARCHS = {"llama": ("causal_lm", ["q_proj", "v_proj", "down_proj"]),
         "gpt2": ("causal_lm", ["c_attn", "c_fc"]),
         "bert": ("sequence_classification", ["query", "value", "output.dense"])}
PROBE = Probe(*batch(lengths=(10, 6, 8)))


def _config(arch, **kw):
    task, targets = ARCHS[arch]
    return layer_config(arch, task, r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                        **kw)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_dora_file_loads_with_peft_logits(tiny_dir, tmp_path, arch):
    task = ARCHS[arch][0]
    path = tiny_dir(arch, task)
    def edit(pm):  # a magnitude that is no longer the weight norm, as after training
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))

    pm = peft_saved(hf_class(arch, task).from_pretrained(path),
                    peft.LoraConfig(init_lora_weights=False, **_config(arch)), str(tmp_path), edit)
    want = PROBE.torch(pm)
    ours = PeftModel.from_pretrained(from_pretrained(path, task=task, progress=False),
                                     str(tmp_path))
    assert ours.peft_config.use_dora
    diff = PROBE.diff(ARCHS[arch][0], PROBE.ours(ours), want)
    print(f"{arch}: PEFT DoRA file -> peftjax, max|logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peftjax_dora_trains_and_loads_in_peft(tiny_dir, tmp_path, arch):
    task = ARCHS[arch][0]
    path = tiny_dir(arch, task)
    base = PROBE.ours(from_pretrained(path, task=task, progress=False))
    ours = get_peft_model(from_pretrained(path, task=task, progress=False),
                          LoraConfig(**_config(arch)), rngs=nnx.Rngs(0))
    # m = ||W|| and B = 0: the base model up to float32 rounding of the recomputed norm
    assert PROBE.diff(ARCHS[arch][0], PROBE.ours(ours), base) <= 2e-5
    losses = train_briefly(ours, task, *batch(lengths=(12, 9, 7, 12), seed=5))
    assert losses[-1] < losses[0]
    after = PROBE.ours(ours)
    ours.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    hf = hf_class(arch, task).from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    diff = PROBE.diff(ARCHS[arch][0], after, PROBE.torch(pm))
    print(f"{arch}: peftjax DoRA file -> PEFT, max|logit diff| = {diff:.2e}")
    assert PROBE.diff(ARCHS[arch][0], after, base) > 1e-3 and diff <= 1e-4


def test_dora_merge_unmerge_and_4bit(tiny_dir):
    path = tiny_dir("llama")
    model = get_peft_model(from_pretrained(path, progress=False),
                           LoraConfig(**_config("llama"), init_lora_weights=False),
                           rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, layer in model.lora_layers():
        m = layer.lora["default"].lora_magnitude_vector
        m[...] = m[...] * jnp.asarray(rng.uniform(0.8, 1.2, m[...].shape), jnp.float32)
    want = PROBE.ours(model)
    kernels = {n: np.asarray(layer.kernel[...]) for n, layer in model.lora_layers()}
    model.merge_adapter()  # float32 rounding of W * m / n, on logits of size ~3: <= 5e-5
    assert PROBE.diff("causal_lm", PROBE.ours(model), want) <= 5e-5
    model.unmerge_adapter()
    for n, layer in model.lora_layers():
        np.testing.assert_allclose(np.asarray(layer.kernel[...]), kernels[n], rtol=0, atol=1e-6)
    # the kernels are back within 1e-6 (rounding)
    assert PROBE.diff("causal_lm", PROBE.ours(model), want) <= 5e-5
    plain = model.merge_and_unload()  # a DoRA adapter served as plain weights
    assert not any(hasattr(m, "lora") for _, m in nnx.iter_graph(plain))
    assert PROBE.diff("causal_lm", PROBE.ours(plain), want) <= 5e-5

    from peftjax.quant import QuantConfig
    q = from_pretrained(path, progress=False,
                        quantization=QuantConfig("nf4", blocksize=32, compute_dtype="float32"))
    qbase = PROBE.ours(q)
    qmodel = get_peft_model(q, LoraConfig(**_config("llama")), rngs=nnx.Rngs(0))
    # the norms of the dequantized weight: the 4-bit base model up to rounding
    assert PROBE.diff("causal_lm", PROBE.ours(qmodel), qbase) <= 1e-5
    losses = train_briefly(qmodel, "causal_lm", *batch(lengths=(12, 9, 7, 12), seed=5))
    assert losses[-1] < losses[0]
    trained = PROBE.ours(qmodel)
    assert PROBE.diff("causal_lm", PROBE.ours(qmodel.merge_and_unload()), trained) <= 1e-4


def test_dora_gradient_treats_the_norm_as_constant(tiny_dir):
    """The magnitude's and B's gradients equal autodiff of ``(m / stop_gradient(n)) * (x W +
    s x A B)`` written out for one layer."""
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                      init_lora_weights=False), rngs=nnx.Rngs(1))
    layer = model.lora_layers()[0][1]
    f = layer.lora["default"]
    x = jax.random.normal(jax.random.key(0), (5, layer.in_features))
    W = np.asarray(layer.kernel[...])

    def written(m, b):
        a = f.lora_A[...]
        n = jax.lax.stop_gradient(jnp.linalg.norm(W + f.scaling * a @ b, axis=0))
        return jnp.sum(jnp.sin((m / n) * (x @ W + f.scaling * (x @ a) @ b)))

    grads = nnx.grad(lambda lay: jnp.sum(jnp.sin(lay(x))),
                     argnums=nnx.DiffState(0, LoraParam))(layer)
    got = (grads["lora"]["default"]["lora_magnitude_vector"][...],
           grads["lora"]["default"]["lora_B"][...])
    want = jax.grad(written, argnums=(0, 1))(f.lora_magnitude_vector[...], f.lora_B[...])
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 1e-3
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_dora_adapters_are_not_combined(tiny_dir):
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           LoraConfig(r=2, use_dora=True), rngs=nnx.Rngs(0))
    model.add_adapter("plain", LoraConfig(r=2))
    with pytest.raises(ValueError, match="lora adapter 'default' cannot be active together"):
        model.set_adapter(["default", "plain"])
