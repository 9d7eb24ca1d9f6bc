"""Named adapters against PyTorch PEFT: two LoRA adapters (different targets and ranks) on one
tiny Llama classifier, each with its own trained ``score`` head (PEFT's ``modules_to_save``
copy per adapter). PEFT writes both (``default`` at the top, the other in a subdirectory);
peftjax loads them as named adapters and must give PEFT's logits for each active adapter, for
both active together, and with adapters disabled (within 1e-4); peftjax's files read back
equal. Plus: only the active adapter trains, and the errors for misuse."""

from __future__ import annotations

import os
import warnings

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from peftjax import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftjax.models import from_pretrained
from peftjax.tuners import AdapterParam
from tests.conftest import batch, hf_class, hf_positions, train_briefly

TASK = "sequence_classification"
IDS, MASK = batch(lengths=(11, 7, 9))
CONFIGS = {  # PEFT LoraConfig kwargs per adapter; random B so every adapter changes outputs
    "default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                    init_lora_weights=False),
    "second": dict(r=2, lora_alpha=6, target_modules=["k_proj", "down_proj", "v_proj"],
                   task_type="SEQ_CLS", init_lora_weights=False),
}


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                     position_ids=torch.tensor(hf_positions(MASK))).logits.numpy()


def _ours(model):
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(IDS),
                                                          jnp.asarray(MASK))
    return np.asarray(out.logits)


def _close(name, ours, theirs, tol=1e-4):
    diff = np.abs(ours - theirs).max()
    print(f"{name}: max|logit diff| = {diff:.2e}")
    assert diff <= tol, (name, diff)


@pytest.fixture(scope="module")
def peft_two_adapters(tiny_dir, tmp_path_factory):
    """PEFT model with adapters ``default`` and ``second``, each with its own random score head,
    saved to a directory; logits for every activation."""
    path = tiny_dir("llama", TASK)
    out = str(tmp_path_factory.mktemp("two_adapters"))
    torch.manual_seed(0)
    hf = hf_class("llama", TASK).from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(**CONFIGS["default"]))
        pm.add_adapter("second", peft.LoraConfig(**CONFIGS["second"]))
    with torch.no_grad():
        for name in CONFIGS:  # each adapter's head copy differs from the original and the other
            pm.base_model.model.score.modules_to_save[name].weight.normal_(0, 0.3)
    pm.eval()
    logits = {}
    for name in CONFIGS:
        pm.set_adapter(name)
        logits[name] = _torch_logits(pm)
    with pm.disable_adapter():
        logits["disabled"] = _torch_logits(pm)
    pm.set_adapter("default")
    pm.save_pretrained(out)
    return path, out, logits


def test_named_lora_adapters_match_peft(peft_two_adapters, tmp_path):
    path, saved, theirs = peft_two_adapters
    assert os.path.isfile(os.path.join(saved, "second", "adapter_config.json"))
    model = PeftModel.from_pretrained(from_pretrained(path, task=TASK, progress=False), saved)
    model.load_adapter(os.path.join(saved, "second"), "second")
    assert model.active_adapter == "default" and sorted(model.peft_configs) == sorted(CONFIGS)
    _close("default", _ours(model), theirs["default"])
    model.set_adapter("second")
    assert model.active_adapters == ["second"] and model.peft_config.r == 2
    _close("second", _ours(model), theirs["second"])
    with model.disable_adapter():  # LoRA off and the original score head
        _close("disabled", _ours(model), theirs["disabled"])
    _close("second again", _ours(model), theirs["second"])

    # both active: each trains its own head, and one model has one head (PEFT refuses too)
    with pytest.raises(ValueError, match="at most one of the active adapters may"):
        model.set_adapter(["default", "second"])
    assert model.active_adapters == ["second"]

    # our files: PEFT's layout (default on top, others in subdirectories), same tensors
    model.set_adapter("default")
    model.save_pretrained(str(tmp_path))
    for sub in ("", "second"):
        mine = load_file(os.path.join(tmp_path, sub, "adapter_model.safetensors"))
        ref = load_file(os.path.join(saved, sub, "adapter_model.safetensors"))
        assert sorted(mine) == sorted(ref), (sorted(mine), sorted(ref))
        for k in ref:
            np.testing.assert_allclose(mine[k], ref[k], rtol=0, atol=1e-7, err_msg=k)


def test_two_active_lora_adapters_add_up_as_in_peft(tiny_dir, tmp_path):
    """Causal LM, no heads: PEFT's ``LoraModel.set_adapter([a, b])`` applies both deltas."""
    path = tiny_dir("llama")
    torch.manual_seed(1)
    hf = hf_class("llama", "causal_lm").from_pretrained(path).eval()
    kw = {k: {**v, "task_type": "CAUSAL_LM"} for k, v in CONFIGS.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(**kw["default"]))
        pm.add_adapter("second", peft.LoraConfig(**kw["second"]))
    pm.save_pretrained(str(tmp_path))
    pm.base_model.set_adapter(["default", "second"])
    theirs = _torch_logits(pm.eval())
    model = PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path))
    model.load_adapter(str(tmp_path / "second"), "second")
    single = _ours(model)
    model.set_adapter(["default", "second"])
    assert model.active_adapters == ["default", "second"]
    m = MASK.astype(bool)
    _close("both active", _ours(model)[m], theirs[m])
    assert np.abs(_ours(model) - single)[m].max() > 1e-3
    model.merge_adapter()  # both merge into the weights: same outputs, no adapter math
    _close("both merged", _ours(model)[m], theirs[m])
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with model.disable_adapter():
            pass
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model.set_adapter("second")
    model.save_pretrained(str(tmp_path / "merged"))  # merging leaves the factors as they were
    for sub in ("", "second"):
        a = load_file(str(tmp_path / sub / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "merged" / sub / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    model.unmerge_adapter()
    _close("both unmerged", _ours(model)[m], theirs[m])


def test_only_the_active_adapter_trains_and_deleting(tiny_dir):
    path = tiny_dir("llama")
    model = get_peft_model(from_pretrained(path, progress=False),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), rngs=nnx.Rngs(0))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj", "up_proj"]))
    model.set_adapter("second")

    def leaves(name):
        return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, AdapterParam))
                if v.get_metadata()["adapter"] == name}

    before = {n: leaves(n) for n in ("default", "second")}
    mask = dict(nnx.to_flat_state(model.trainable_mask()))
    assert {p for p, on in mask.items() if on} == set(before["second"])
    ids, mask_ = batch(lengths=(9, 6))
    train_briefly(model, "causal_lm", ids, mask_, steps=2)
    after = {n: leaves(n) for n in ("default", "second")}
    assert all(np.array_equal(before["default"][p], after["default"][p]) for p in after["default"])
    assert any(not np.array_equal(before["second"][p], after["second"][p])
               for p in after["second"])

    model.delete_adapter("second")
    assert model.active_adapter == "default" and list(model.peft_configs) == ["default"]
    assert set(leaves("default")) == set(before["default"]) and not leaves("second")
    # layers only "second" adapted (up_proj) are plain again
    assert not any("up_proj" in n for n, _ in model.lora_layers())


def test_named_adapter_errors(tiny_dir):
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           LoraConfig(r=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="different methods: the model's are lora"):
        model.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        model.add_adapter("default", LoraConfig(r=2))
    with pytest.raises(ValueError, match="adapter name 'a.b'"):
        model.add_adapter("a.b", LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]; adapters: \['default'\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="only adapter; unload"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="matches no linear layer"):  # nothing is added
        model.add_adapter("bad", LoraConfig(r=2, target_modules=["nothing_like_this"]))
    assert list(model.peft_configs) == ["default"]
    prompts = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                             PromptTuningConfig(num_virtual_tokens=2), rngs=nnx.Rngs(0))
    prompts.add_adapter("b", PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prompt_tuning adapter .default. cannot be active"):
        prompts.set_adapter(["default", "b"])
