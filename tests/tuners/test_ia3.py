"""(IA)³ against PyTorch PEFT: PEFT's default targets and feed-forward flags per architecture,
trainable counts, PEFT files both ways with logits within 1e-4 (random vectors, so the adapter
really changes the outputs), merge / unmerge, and a QLoRA-style 4-bit base."""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from peftjax import IA3Config, PeftModel, count_parameters, get_peft_model
from peftjax.models import from_pretrained
from peftjax.tuners._ia3 import IA3Mixin
from peftjax.tuners._layer import adapted_layers
from tests.conftest import batch, hf_class, train_briefly
from tests.tuners.common import Probe

# arch -> task (encoders as classifiers, so that the head and padding matter)
ARCHS = {"llama": "causal_lm", "qwen2": "causal_lm", "gemma": "causal_lm", "gpt2": "causal_lm",
         "bert": "sequence_classification"}
PROBE = Probe(*batch(lengths=(10, 6, 8)))


def _peft_ia3(path, arch, **cfg):
    hf = hf_class(arch, ARCHS[arch]).from_pretrained(path).eval()
    task_type = "SEQ_CLS" if ARCHS[arch] != "causal_lm" else "CAUSAL_LM"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(hf, peft.IA3Config(task_type=task_type, **cfg)).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_ia3_file_loads_with_peft_logits(tiny_dir, tmp_path, arch):
    """PEFT's defaults, random vectors (init_ia3_weights=False): the same adapted layers with
    the same feed-forward flags, counts, and logits from PEFT's file."""
    path = tiny_dir(arch, ARCHS[arch])
    pm = _peft_ia3(path, arch, init_ia3_weights=False)
    pm.save_pretrained(str(tmp_path))
    theirs = {n: m.is_feedforward for n, m in pm.base_model.model.named_modules()
              if hasattr(m, "ia3_l") and "default" in m.ia3_l}
    ours = PeftModel.from_pretrained(from_pretrained(path, task=ARCHS[arch], progress=False),
                                     str(tmp_path))
    mine = {n: layer.ia3["default"].feedforward
            for n, layer in adapted_layers(ours.base_model, IA3Mixin)}
    assert mine == theirs
    trainable, total = pm.get_nb_trainable_parameters()
    head_copy = sum(p.numel() for n, p in pm.named_parameters() if ".modules_to_save." in n)
    assert count_parameters(ours) == (trainable, total - head_copy)  # PEFT counts its head twice
    base = PROBE.torch(hf_class(arch, ARCHS[arch]).from_pretrained(path).eval())
    want = PROBE.torch(pm)
    assert PROBE.diff(ARCHS[arch], want, base) > 1e-2  # the vectors really change the outputs
    diff = PROBE.diff(ARCHS[arch], PROBE.ours(ours), want)
    print(f"{arch}: PEFT file -> peftjax, max|logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_peftjax_ia3_trains_and_loads_in_peft(tiny_dir, tmp_path, arch):
    path = tiny_dir(arch, ARCHS[arch])
    task = ARCHS[arch]
    cfg = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    ours = get_peft_model(from_pretrained(path, task=task, progress=False), IA3Config(**cfg),
                          rngs=nnx.Rngs(0))
    before = PROBE.ours(ours)
    losses = train_briefly(ours, task, *batch(lengths=(12, 9, 7, 12), seed=5), lr=5e-2)
    assert losses[-1] < losses[0]
    after = PROBE.ours(ours)
    assert PROBE.diff(ARCHS[arch], after, before) > 1e-3
    ours.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"]
    hf = hf_class(arch, task).from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    ref = _peft_ia3(path, arch, **cfg)  # PEFT's own file for the same config: same keys/shapes
    ref.save_pretrained(str(tmp_path / "ref"))
    a = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    diff = PROBE.diff(ARCHS[arch], after, PROBE.torch(pm))
    print(f"{arch}: peftjax file -> PEFT, max|logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_identity_merge_unmerge_and_4bit(tiny_dir):
    path = tiny_dir("llama")
    base = PROBE.ours(from_pretrained(path, progress=False))
    model = get_peft_model(from_pretrained(path, progress=False), IA3Config(), rngs=nnx.Rngs(0))
    assert np.array_equal(PROBE.ours(model), base)  # vectors at one
    rng = np.random.default_rng(0)
    for _, layer in adapted_layers(model.base_model, IA3Mixin):
        v = layer.ia3["default"].ia3_l
        v[...] = jnp.asarray(rng.uniform(0.5, 1.5, v[...].shape), jnp.float32)
    scaled = PROBE.ours(model)
    kernels = {n: np.asarray(layer.kernel[...])
               for n, layer in adapted_layers(model.base_model, IA3Mixin)}
    model.merge_adapter()
    PROBE.assert_close("causal_lm", PROBE.ours(model), scaled)
    model.unmerge_adapter()
    for n, layer in adapted_layers(model.base_model, IA3Mixin):
        np.testing.assert_allclose(np.asarray(layer.kernel[...]), kernels[n], rtol=1e-6,
                                   atol=1e-7)
    merged = model.merge_and_unload()
    assert not adapted_layers(merged)
    PROBE.assert_close("causal_lm", PROBE.ours(merged), scaled)

    from peftjax.quant import QuantConfig
    q = from_pretrained(path, progress=False,
                        quantization=QuantConfig("nf4", blocksize=32, compute_dtype="float32"))
    qbase = PROBE.ours(q)
    qmodel = get_peft_model(q, IA3Config(), rngs=nnx.Rngs(0))
    assert np.array_equal(PROBE.ours(qmodel), qbase)
    losses = train_briefly(qmodel, "causal_lm", *batch(lengths=(12, 9, 7, 12), seed=5), lr=5e-2)
    assert losses[-1] < losses[0]
    trained = PROBE.ours(qmodel)
    with pytest.raises(TypeError, match="4-bit weight in place"):
        qmodel.merge_adapter()
    assert PROBE.diff("causal_lm", PROBE.ours(qmodel.merge_and_unload()), trained) <= 1e-4


def test_ia3_config_errors():
    with pytest.raises(ValueError, match=r"feedforward_modules \['up_proj'\] are not in"):
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(ValueError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="ones")
