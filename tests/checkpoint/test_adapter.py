"""PEFT-format adapter files both ways with PyTorch PEFT: (a) peftjax trains and writes, PEFT loads;
(b) PEFT writes (non-zero B, rsLoRA, rank/alpha patterns, layers_to_transform,
modules_to_save head), peftjax loads. Logits must agree within 1e-4."""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from peftjax import LoraConfig, PeftModel, get_peft_model
from peftjax.models import CheckpointError, from_pretrained
from peftjax.tuners import LoraParam
from tests.conftest import batch, hf_class, hf_positions, train_briefly

# arch -> (task, PEFT task_type, targets, layers_pattern, rank_pattern key, head to save)
SPECS = {
    "llama": ("sequence_classification", "SEQ_CLS", ["q_proj", "v_proj", "down_proj"], "layers",
              "v_proj", "score"),
    "qwen2": ("causal_lm", "CAUSAL_LM", ["q_proj", "k_proj", "o_proj"], "layers", "k_proj", None),
    "gemma": ("causal_lm", "CAUSAL_LM", ["q_proj", "v_proj", "up_proj"], "layers", "up_proj", None),
    "gpt2": ("causal_lm", "CAUSAL_LM", ["c_attn", "c_fc"], "h", "c_fc", None),
    "bert": ("sequence_classification", "SEQ_CLS", ["query", "value", "output.dense"], "layer",
             "value", "classifier"),
}


def _config(arch) -> dict:
    task, task_type, targets, pattern, rank_key, head = SPECS[arch]
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, use_rslora=True,
               rank_pattern={rank_key: 2}, alpha_pattern={targets[0]: 5.0},
               layers_to_transform=[0, 2], layers_pattern=pattern, task_type=task_type)
    if head:
        cfg["modules_to_save"] = [head]
    return cfg


def _run_torch(model, arch, ids, mask):
    kw = {} if arch == "bert" else {"position_ids": torch.tensor(hf_positions(mask))}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()


def _run_ours(model, ids, mask):
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out.logits)


def _compare(arch, a, b, mask):
    if SPECS[arch][0] == "causal_lm":
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    diff = np.abs(a - b).max()
    print(f"{arch}: max|logit diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("arch", list(SPECS))
def test_peft_adapter_loads_in_peftjax(tiny_dir, tmp_path, arch):
    task = SPECS[arch][0]
    path = tiny_dir(arch, task)
    hf = hf_class(arch, task).from_pretrained(path).eval()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, peft.LoraConfig(**_config(arch), init_lora_weights=False,
                                                     **({"fan_in_fan_out": True} if arch == "gpt2" else {})))
    head = SPECS[arch][5]
    if head:  # a trained head differs from the base checkpoint's
        with torch.no_grad():
            for p in getattr(pm.base_model.model, head).modules_to_save["default"].parameters():
                p.normal_(0, 0.5)
    pm.eval().save_pretrained(str(tmp_path))
    ids, mask = batch(lengths=(10, 6))
    want = _run_torch(pm, arch, ids, mask)
    base_only = _run_torch(hf_class(arch, task).from_pretrained(path).eval(), arch, ids, mask)
    assert np.abs(want - base_only).max() > 1e-2
    ours = PeftModel.from_pretrained(from_pretrained(path, task=task, progress=False), str(tmp_path))
    assert ours.peft_config.use_rslora and ours.peft_config.layers_to_transform == (0, 2)
    _compare(arch, _run_ours(ours, ids, mask), want, mask)


@pytest.mark.parametrize("arch", list(SPECS))
def test_peftjax_trained_adapter_loads_in_peft(tiny_dir, tmp_path, arch):
    """(a): an adapter (and its modules_to_save head) trained by peftjax's train step."""
    task = SPECS[arch][0]
    path = tiny_dir(arch, task)
    ours = get_peft_model(from_pretrained(path, task=task, progress=False),
                          LoraConfig(**_config(arch)), rngs=nnx.Rngs(3))
    ids, mask = batch(lengths=(10, 6))
    before = _run_ours(ours, ids, mask)
    losses = train_briefly(ours, task, *batch(lengths=(12, 9, 7, 12), seed=5))
    assert losses[-1] < losses[0]
    trained_b = [np.abs(np.asarray(layer.lora["default"].lora_B[...])).max()
                 for _, layer in ours.lora_layers()]
    assert min(trained_b) > 0                           # every B moved away from zero
    ours.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["use_rslora"] is True
    hf = hf_class(arch, task).from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    after = _run_ours(ours, ids, mask)
    assert np.abs(after - before).max() > 1e-3           # training changed the outputs
    _compare(arch, after, _run_torch(pm, arch, ids, mask), mask)


def test_adapter_errors(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path))
    ours = get_peft_model(from_pretrained(path, progress=False), LoraConfig(r=2),
                          rngs=nnx.Rngs(0))
    ours.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(CheckpointError, match=r"not implemented here: \{'lora_bias': True\}"):
        PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path))
    # a config that says DoRA over a file without magnitudes: the strict check names them
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"missing 6: \[.*lora_magnitude_vector"):
        PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3,
                                                             "init_lora_weights": False}))
    base = from_pretrained(path, progress=False)
    ids, mask = batch()
    before = np.asarray(base(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    with pytest.raises(CheckpointError, match=r"lora_A.weight has shape \(2, 64\), the model "
                       r"expects \(3, 64\)"):
        PeftModel.from_pretrained(base, str(tmp_path))
    # a failed load leaves the caller's model as it was (no LoRA layers, same outputs)
    assert not list(nnx.to_flat_state(nnx.state(base, LoraParam)))
    after = np.asarray(base(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    np.testing.assert_array_equal(before, after)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj",
                                                                                        "k_proj"]}))
    with pytest.raises(CheckpointError, match=r"missing 6: .*k_proj.lora_A.weight"):
        PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path))
