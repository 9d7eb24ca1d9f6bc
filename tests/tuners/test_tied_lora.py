"""Tied-LoRA: trainable counts equal the closed form for every choice of trained parts, one pair
of factors per module type shared by all its layers (a gradient step moves them once, for every
layer), frozen parts stay bit-identical, identity at init, merge; and the adapter written as a
plain LoRA file (``save_as_lora``) gives PyTorch PEFT our logits within 1e-4 on Llama, GPT-2
(Conv1D) and a BERT classifier."""

from __future__ import annotations

import warnings

import numpy as np
import peft
import pytest
from flax import nnx

from peftjax import PeftModel, TiedLoraConfig, count_parameters, get_peft_model
from peftjax.models import from_pretrained
from peftjax.tuners import AdapterParam, save_as_lora
from peftjax.tuners._layer import adapted_layers
from peftjax.tuners._tied_lora import TiedLoraMixin, _slot, module_type
from tests.conftest import batch, hf_class, train_briefly
from tests.tuners.common import Probe, layer_config

PROBE = Probe(*batch(lengths=(10, 6, 8)))
TARGETS = ["q_proj", "k_proj", "down_proj"]  # k_proj: GQA, another shape than q_proj


def _shapes(model) -> dict:
    out = {}
    for name, layer in adapted_layers(model.base_model, TiedLoraMixin):
        out.setdefault(module_type(name), []).append((layer.in_features, layer.out_features))
    return out


@pytest.mark.parametrize("trainable", ["ABuv", "Buv", "uv", "AB", "Bu", "v"])
def test_counts_sharing_and_frozen_parts(tiny_dir, trainable):
    path = tiny_dir("llama")
    base = PROBE.ours(from_pretrained(path, progress=False))
    config = TiedLoraConfig(r=4, target_modules=TARGETS, trainable=trainable)
    model = get_peft_model(from_pretrained(path, progress=False), config, rngs=nnx.Rngs(0))
    assert np.array_equal(PROBE.ours(model), base)  # v (or B) starts at zero
    shapes = _shapes(model)
    assert sorted(shapes) == ["mlp.down_proj", "self_attn.k_proj", "self_attn.q_proj"]
    assert all(len(v) == 3 for v in shapes.values())  # one per block
    trained, _ = count_parameters(model)
    assert trained == config.parameter_count(shapes)
    lora_like = sum(len(v) * 4 * (i + o) for v in shapes.values() for (i, o) in v[:1])
    print(f"trainable={trainable}: {trained} parameters (LoRA r=4 on the same layers: "
          f"{lora_like})")
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    # the shared factors are stored once: one A and one B per type in the state
    assert sum(p[-1] == "lora_A" for p in before) == len(TARGETS)
    losses = train_briefly(model, "causal_lm", *batch(lengths=(12, 9, 7, 12), seed=5), lr=5e-2)
    assert losses[-1] < losses[0]
    after = dict(nnx.to_flat_state(nnx.state(model, AdapterParam)))
    part = {"lora_A": "A", "lora_B": "B", "tied_lora_u": "u", "tied_lora_v": "v"}
    for p, old in before.items():
        moved = not np.array_equal(np.asarray(after[p][...]), old)
        assert moved == (part[p[-1]] in config.trainable), (p, moved)
    factors = model.added["tied_lora_factors"]
    for name, layer in adapted_layers(model.base_model, TiedLoraMixin):
        assert layer.tied_lora["default"].shared is factors[_slot(module_type(name))]


def test_config_errors_and_merge(tiny_dir):
    with pytest.raises(ValueError, match="neither B nor v trains"):
        TiedLoraConfig(trainable="Au")
    with pytest.raises(ValueError, match="must name a non-empty subset"):
        TiedLoraConfig(trainable=["A", "w"])
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           TiedLoraConfig(r=4, target_modules=TARGETS, init_weights=False),
                           rngs=nnx.Rngs(0))
    want = PROBE.ours(model)
    plain = model.merge_and_unload()
    assert not adapted_layers(plain)
    assert PROBE.diff("causal_lm", PROBE.ours(plain), want) <= 5e-5


ARCHS = {"llama": ("causal_lm", TARGETS), "gpt2": ("causal_lm", None),
         "bert": ("sequence_classification", None)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_as_lora_gives_peft_our_logits(tiny_dir, tmp_path, arch):
    task, targets = ARCHS[arch]
    path = tiny_dir(arch, task)
    cfg = layer_config(arch, task, r=4, lora_alpha=16, target_modules=targets)
    ours = get_peft_model(from_pretrained(path, task=task, progress=False),
                          TiedLoraConfig(**cfg, init_weights=False), rngs=nnx.Rngs(0))
    train_briefly(ours, task, *batch(lengths=(12, 9, 7, 12), seed=5), lr=5e-2)
    want = PROBE.ours(ours)
    ours.save_pretrained(str(tmp_path / "tied"))  # peftjax's own format round-trips
    again = PeftModel.from_pretrained(from_pretrained(path, task=task, progress=False),
                                      str(tmp_path / "tied"))
    assert again.peft_config == ours.peft_config
    np.testing.assert_array_equal(PROBE.ours(again), want)
    save_as_lora(ours, str(tmp_path / "lora"))
    hf = hf_class(arch, task).from_pretrained(path).eval()
    base = PROBE.torch(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "lora")).eval()
    diff = PROBE.diff(task, want, PROBE.torch(pm))
    print(f"{arch}: Tied-LoRA saved as LoRA -> PEFT, max|logit diff| = {diff:.2e}")
    assert PROBE.diff(task, want, base) > 1e-3 and diff <= 1e-4
