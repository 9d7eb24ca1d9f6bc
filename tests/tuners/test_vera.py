"""VeRA against PyTorch PEFT: PEFT's files (shared projections saved, trained-looking vectors) load
here with PEFT's logits and ours load in PEFT, within 1e-4, on Llama (targets of different
shapes: the shared matrices are sliced), GPT-2 (Conv1D) and a BERT classifier; the same adapted
layers and trainable counts; identity at init; merge; the shared matrices are frozen and the
file holds them."""

from __future__ import annotations

import json
import warnings

import numpy as np
import peft
import pytest
from flax import nnx
from safetensors.numpy import load_file

from peftjax import PeftModel, VeraConfig, count_parameters, get_peft_model
from peftjax.models import from_pretrained
from peftjax.tuners._layer import adapted_layers
from peftjax.tuners._vera import Projection, VeraMixin
from tests.conftest import batch, hf_class, train_briefly
from tests.tuners.common import Probe, layer_config, peft_saved

ARCHS = {"llama": ("causal_lm", ["q_proj", "k_proj", "down_proj"]),
         "gpt2": ("causal_lm", None),
         "bert": ("sequence_classification", None)}
PROBE = Probe(*batch(lengths=(10, 6, 8)))


def _config(arch, **kw) -> dict:
    task, targets = ARCHS[arch]
    return layer_config(arch, task, r=8, target_modules=targets, **kw)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_vera_file_loads_with_peft_logits(tiny_dir, tmp_path, arch):
    task = ARCHS[arch][0]
    path = tiny_dir(arch, task)
    pm = peft_saved(hf_class(arch, task).from_pretrained(path),
                    peft.VeraConfig(init_weights=False, **_config(arch)), str(tmp_path))
    want = PROBE.torch(pm)
    ours = PeftModel.from_pretrained(from_pretrained(path, task=task, progress=False),
                                     str(tmp_path))
    theirs = sorted(n for n, m in pm.base_model.model.named_modules()
                    if hasattr(m, "vera_lambda_b") and "default" in m.vera_lambda_b)
    assert sorted(n for n, _ in adapted_layers(ours.base_model, VeraMixin)) == theirs
    trainable, total = pm.get_nb_trainable_parameters()
    head_copy = sum(p.numel() for n, p in pm.named_parameters() if ".modules_to_save." in n)
    assert count_parameters(ours) == (trainable, total - head_copy)
    base = PROBE.torch(hf_class(arch, task).from_pretrained(path).eval())
    assert PROBE.diff(task, want, base) > 1e-3  # the adapter changes the outputs
    diff = PROBE.diff(task, PROBE.ours(ours), want)
    print(f"{arch}: PEFT VeRA file -> peftjax, max|logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peftjax_vera_trains_and_loads_in_peft(tiny_dir, tmp_path, arch):
    task = ARCHS[arch][0]
    path = tiny_dir(arch, task)
    base = PROBE.ours(from_pretrained(path, task=task, progress=False))
    ours = get_peft_model(from_pretrained(path, task=task, progress=False),
                          VeraConfig(**_config(arch)), rngs=nnx.Rngs(0))
    assert np.array_equal(PROBE.ours(ours), base)  # lambda_b starts at zero
    shared = {p: np.asarray(v[...]) for p, v in
              nnx.to_flat_state(nnx.state(ours, Projection))}
    losses = train_briefly(ours, task, *batch(lengths=(12, 9, 7, 12), seed=5), lr=5e-2)
    assert losses[-1] < losses[0]
    for p, v in nnx.to_flat_state(nnx.state(ours, Projection)):  # frozen, shared once
        assert np.array_equal(np.asarray(v[...]), shared[p])
    assert len(shared) == 2
    after = PROBE.ours(ours)
    ours.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["save_projection"] is True
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.vera_A"].shape[0] == 8
    hf = hf_class(arch, task).from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    diff = PROBE.diff(task, after, PROBE.torch(pm))
    print(f"{arch}: peftjax VeRA file -> PEFT, max|logit diff| = {diff:.2e}")
    assert PROBE.diff(task, after, base) > 1e-3 and diff <= 1e-4


def test_vera_merge_and_errors(tiny_dir):
    path = tiny_dir("llama")
    model = get_peft_model(from_pretrained(path, progress=False),
                           VeraConfig(**_config("llama"), init_weights=False), rngs=nnx.Rngs(0))
    want = PROBE.ours(model)
    model.merge_adapter()  # float32 rounding of the folded weights, on logits of size ~3
    assert PROBE.diff("causal_lm", PROBE.ours(model), want) <= 5e-5
    model.unmerge_adapter()
    assert PROBE.diff("causal_lm", PROBE.ours(model), want) <= 5e-5
    plain = model.merge_and_unload()
    assert not adapted_layers(plain)
    assert PROBE.diff("causal_lm", PROBE.ours(plain), want) <= 5e-5
    with pytest.raises(ValueError, match="save_projection=False"):
        VeraConfig(save_projection=False)
    with pytest.raises(ValueError, match="bias='lora_only' must be one of"):
        VeraConfig(bias="lora_only")
