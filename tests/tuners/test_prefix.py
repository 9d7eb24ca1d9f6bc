"""Prefix tuning against PyTorch PEFT: files both ways with logits within 1e-4 (GQA, q/k norms,
sliding windows shorter than prefix + sequence, soft-capping, GPT-2, BERT), the projection saved
as the plain prefixes PEFT saves, greedy generation with the prefix written once into the cache,
left padding equal to right padding, and the errors for configs that do not fit."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
from flax import nnx

import peftjax
from peftjax import PeftModel, PrefixTuningConfig, get_peft_model
from peftjax.models import from_pretrained
from tests.conftest import batch, hf_class
from tests.tuners.common import greedy_reference, max_diff, our_logits, quiet, torch_logits

V = 5
SPECS = {"llama": ("causal_lm", "CAUSAL_LM"), "mistral": ("causal_lm", "CAUSAL_LM"),
         "qwen3": ("causal_lm", "CAUSAL_LM"), "gemma": ("causal_lm", "CAUSAL_LM"),
         "gemma2": ("causal_lm", "CAUSAL_LM"), "gemma3": ("causal_lm", "CAUSAL_LM"),
         "gpt2": ("causal_lm", "CAUSAL_LM"), "qwen2": ("sequence_classification", "SEQ_CLS"),
         "bert": ("sequence_classification", "SEQ_CLS")}


@pytest.mark.parametrize("arch", list(SPECS))
def test_peft_prefix_loads_here_and_ours_loads_in_peft(tiny_dir, tmp_path, arch):
    task, task_type = SPECS[arch]
    path = tiny_dir(arch, task)
    ids, mask = batch(lengths=(9, 6))  # 5 + 9 > the sliding windows (5) of mistral/gemma2/3
    # (a) PEFT writes, we load
    torch.manual_seed(1)
    hf = quiet(peft.get_peft_model, hf_class(arch, task).from_pretrained(path).eval(),
                peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=V)).eval()
    want = torch_logits(hf, ids, mask)
    hf.save_pretrained(str(tmp_path / "theirs"))
    base = from_pretrained(path, task=task, progress=False)
    base_logits = our_logits(base, ids, mask)
    ours = PeftModel.from_pretrained(base, str(tmp_path / "theirs"))
    got = our_logits(ours, ids, mask)
    d_in = max_diff(task, got, want, mask)
    moved = max_diff(task, got, base_logits, mask)  # the prefix matters at all
    # (b) we write (our own random prefix), PEFT loads
    mine = get_peft_model(from_pretrained(path, task=task, progress=False),
                          PrefixTuningConfig(num_virtual_tokens=V, task_type=task_type),
                          rngs=nnx.Rngs(3))
    mine.save_pretrained(str(tmp_path / "ours"))
    back = quiet(peft.PeftModel.from_pretrained, hf_class(arch, task).from_pretrained(path).eval(),
                  str(tmp_path / "ours")).eval()
    d_out = max_diff(task, our_logits(mine, ids, mask), torch_logits(back, ids, mask), mask)
    print(f"{arch} prefix tuning: PEFT -> peftjax {d_in:.2e}, peftjax -> PEFT {d_out:.2e} "
          f"(prefix moves logits by {moved:.2f})")
    assert d_in <= 1e-4 and d_out <= 1e-4 and moved > 1e-2
    theirs_cfg = json.load(open(tmp_path / "theirs" / "adapter_config.json"))
    ours_cfg = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    for key in ("token_dim", "num_attention_heads", "num_layers", "num_virtual_tokens",
                "encoder_hidden_size", "peft_type"):  # the fields PEFT fills, filled alike
        assert ours_cfg[key] == theirs_cfg[key], key


def test_projection_trains_and_saves_the_plain_prefixes(tiny_dir, tmp_path):
    """``prefix_projection=True``: an embedding + MLP train; the file holds the prefixes they
    produce, which PEFT (and peftjax) load as a plain table with the same outputs."""
    path = tiny_dir("llama")
    ids, mask = batch(lengths=(9, 6))
    cfg = PrefixTuningConfig(num_virtual_tokens=V, prefix_projection=True, encoder_hidden_size=24,
                             task_type="CAUSAL_LM")
    mine = get_peft_model(from_pretrained(path, progress=False), cfg, rngs=nnx.Rngs(0))
    enc = mine.added["prefix_encoder"]
    assert enc.embedding[...].shape == (V, 32) and enc.w_out[...].shape == (24, 3 * 2 * 32)
    mine.save_pretrained(str(tmp_path / "proj"))
    want = our_logits(mine, ids, mask)
    back = quiet(peft.PeftModel.from_pretrained,
                  hf_class("llama", "causal_lm").from_pretrained(path).eval(),
                  str(tmp_path / "proj")).eval()
    assert max_diff("causal_lm", want, torch_logits(back, ids, mask), mask) <= 1e-4
    again = PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path / "proj"))
    assert not again.added["prefix_encoder"].projected
    np.testing.assert_allclose(our_logits(again, ids, mask)[mask == 1], want[mask == 1],
                               atol=1e-5)
    assert json.load(open(tmp_path / "proj" / "adapter_config.json"))["prefix_projection"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_equals_peft(tiny_dir, tmp_path, arch):
    """The prefix is written into the cache once (init_cache); left-padded prompts of different
    lengths; greedy tokens equal PEFT's model extended greedily one token at a time."""
    path = tiny_dir(arch)
    mine = get_peft_model(from_pretrained(path, progress=False),
                          PrefixTuningConfig(num_virtual_tokens=V, task_type="CAUSAL_LM"),
                          rngs=nnx.Rngs(5))
    mine.save_pretrained(str(tmp_path / "p"))
    rows = [[5, 17, 33, 8, 90, 12, 7], [44, 3, 21]]
    ours = peftjax.generate(mine, rows, max_new_tokens=8, eos_token_id=-1, bucket=None)
    hf = quiet(peft.PeftModel.from_pretrained,
                hf_class(arch, "causal_lm").from_pretrained(path), str(tmp_path / "p")).eval()
    for row, got in zip(rows, ours.sequences()):
        assert got == greedy_reference(hf, row, 8), (arch, row)


@pytest.mark.parametrize("arch,task", [("qwen2", "causal_lm"), ("gpt2", "causal_lm"),
                                       ("qwen2", "sequence_classification"),
                                       ("roberta", "sequence_classification")])
def test_left_padding_equals_right_padding(tiny_dir, arch, task):
    """Positions count real tokens after the prefix, so the padding side changes nothing
    (RoBERTa's too, which PEFT 0.21 cannot prefix-tune on transformers 4.57). Not so under a
    sliding window shorter than the sequence: windows count cache slots, as in transformers, and
    left padding puts slots between the prefix and the tokens."""
    model = get_peft_model(from_pretrained(tiny_dir(arch, task), task=task, progress=False),
                           PrefixTuningConfig(num_virtual_tokens=V), rngs=nnx.Rngs(2))
    ids_r, mask_r = batch(lengths=(9, 4), seed=3)
    ids_l, mask_l = batch(lengths=(9, 4), seed=3, left=True)
    right, left = our_logits(model, ids_r, mask_r), our_logits(model, ids_l, mask_l)
    if task == "causal_lm":
        right, left = right[mask_r == 1], left[mask_l == 1]
    np.testing.assert_allclose(left, right, atol=2e-5)


def test_configs_that_do_not_fit_are_refused(tiny_dir):
    with pytest.raises(ValueError, match="init_weights='ones' must be None"):
        PrefixTuningConfig(init_weights="ones")
    with pytest.raises(ValueError, match="num_virtual_tokens=0"):
        PrefixTuningConfig(num_virtual_tokens=0)
    model = from_pretrained(tiny_dir("llama"), progress=False)
    with pytest.raises(ValueError,
                       match=r"token_dim=64 but the model has 32 .*num_key_value_heads"):
        get_peft_model(model, PrefixTuningConfig(token_dim=64), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="prefix_tuning cannot be merged.*extra keys and values"):
        get_peft_model(model, PrefixTuningConfig(), rngs=nnx.Rngs(0)).merge_and_unload()
