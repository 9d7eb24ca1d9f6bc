"""LLaMA-Adapter against PyTorch PEFT (Llama, Mistral, GPT-2: the families PEFT has): files
both ways with logits within 1e-4 once the gates are open, the zero-gate start equal to the
base model on every decoder family, greedy generation, and what the method refuses."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import peftjax
from peftjax import AdaptionPromptConfig, PeftModel, get_peft_model
from peftjax.models import from_pretrained
from tests.conftest import DECODERS, batch, hf_class
from tests.tuners.common import max_diff, our_logits, quiet, torch_logits

CFG = dict(adapter_len=4, adapter_layers=2)


def _open_gates(model, seed):
    """Non-zero gates (a trained adapter's), so the prompts matter."""
    rs = np.random.RandomState(seed)
    for p in model.added["adaption_prompts"]:
        p.adaption_gate[...] = jnp.asarray(rs.uniform(0.5, 1.5, (1,)), jnp.float32)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_peft_adapter_loads_here_and_ours_loads_in_peft(tiny_dir, tmp_path, arch):
    path = tiny_dir(arch)
    ids, mask = batch(lengths=(9, 6))
    real = mask.astype(bool)
    # (a) PEFT writes (gates set non-zero, as after training), we load
    torch.manual_seed(1)
    hf = quiet(peft.get_peft_model, hf_class(arch, "causal_lm").from_pretrained(path).eval(),
                peft.AdaptionPromptConfig(task_type="CAUSAL_LM", **CFG)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(0.8)
    want = torch_logits(hf, ids, mask)
    hf.save_pretrained(str(tmp_path / "theirs"))
    base = from_pretrained(path, progress=False)
    base_logits = our_logits(base, ids, mask)
    ours = PeftModel.from_pretrained(base, str(tmp_path / "theirs"))
    got = our_logits(ours, ids, mask)
    d_in = float(np.abs(got[real] - want[real]).max())
    moved = float(np.abs(got[real] - base_logits[real]).max())
    # (b) we write, PEFT loads
    mine = get_peft_model(from_pretrained(path, progress=False),
                          AdaptionPromptConfig(task_type="CAUSAL_LM", **CFG), rngs=nnx.Rngs(3))
    _open_gates(mine, 0)
    mine.save_pretrained(str(tmp_path / "ours"))
    back = quiet(peft.PeftModel.from_pretrained,
                  hf_class(arch, "causal_lm").from_pretrained(path).eval(),
                  str(tmp_path / "ours")).eval()
    d_out = max_diff("causal_lm", our_logits(mine, ids, mask), torch_logits(back, ids, mask), mask)
    print(f"{arch} LLaMA-Adapter: PEFT -> peftjax {d_in:.2e}, peftjax -> PEFT {d_out:.2e} "
          f"(open gates move logits by {moved:.2f})")
    assert d_in <= 1e-4 and d_out <= 1e-4 and moved > 1e-2


@pytest.mark.parametrize("arch", DECODERS + ["gpt2"])
def test_zero_gate_is_the_base_model_and_open_gates_are_not(tiny_dir, arch):
    path = tiny_dir(arch)
    ids, mask = batch(lengths=(9, 6), left=True)
    base = our_logits(from_pretrained(path, progress=False), ids, mask)
    model = get_peft_model(from_pretrained(path, progress=False), AdaptionPromptConfig(**CFG),
                           rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(our_logits(model, ids, mask), base)
    _open_gates(model, 1)
    assert np.abs(our_logits(model, ids, mask) - base)[mask == 1].max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_equals_peft(tiny_dir, tmp_path, arch):
    path = tiny_dir(arch)
    mine = get_peft_model(from_pretrained(path, progress=False),
                          AdaptionPromptConfig(task_type="CAUSAL_LM", **CFG), rngs=nnx.Rngs(5))
    _open_gates(mine, 2)
    mine.save_pretrained(str(tmp_path / "a"))
    rows = [[5, 17, 33, 8, 90, 12, 7], [44, 3, 21]]
    ours = peftjax.generate(mine, rows, max_new_tokens=8, eos_token_id=-1, bucket=None)
    hf = quiet(peft.PeftModel.from_pretrained,
                hf_class(arch, "causal_lm").from_pretrained(path), str(tmp_path / "a")).eval()
    for row, got in zip(rows, ours.sequences()):
        with torch.no_grad():
            want = hf.generate(input_ids=torch.tensor([row]), max_new_tokens=8, do_sample=False,
                               attention_mask=torch.ones(1, len(row), dtype=torch.long),
                               pad_token_id=0, eos_token_id=None)
        assert got == want[0, len(row):].tolist(), (arch, row)


def test_bad_configs_are_explained(tiny_dir):
    with pytest.raises(ValueError, match="adapter_len=None must be a positive integer"):
        AdaptionPromptConfig(adapter_layers=2)
    with pytest.raises(ValueError, match="adapter_layers=9 but the model has 3 layers"):
        get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                       AdaptionPromptConfig(adapter_len=2, adapter_layers=9), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="defined for decoders; bert is an encoder"):
        get_peft_model(from_pretrained(tiny_dir("bert", "sequence_classification"),
                                       task="sequence_classification", progress=False),
                       AdaptionPromptConfig(**CFG), rngs=nnx.Rngs(0))
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           AdaptionPromptConfig(**CFG), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="adaption_prompt cannot be merged"):
        model.merge_and_unload()
