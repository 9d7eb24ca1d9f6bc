"""The evaluation's generation from the loss's own forward pass (peftjax.train._eval) against
peftjax.generate on each prompt alone (the reference: no padding, a prefill of its own) and
the eval step's loss, for plain models and for methods that put keys in front (prompt and
prefix tuning)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftjax.data import collate
from peftjax.generation import generate
from peftjax.models import from_pretrained
from peftjax.train import make_eval_step, split_model
from peftjax.train._eval import scored_generation
from tests.conftest import train_briefly

EOS = 7


def _examples(vocab=160, n=5, seed=0):
    """Instruction-like rows: a prompt of 4..13 tokens, then a 3-token response (+ ignored
    prompt labels), right-padded by collate as the eval batches are."""
    rs = np.random.RandomState(seed)
    out = []
    for i in range(n):
        p, r = rs.randint(10, vocab, 4 + 2 * i), rs.randint(10, vocab, 3)
        ids = np.concatenate([p, r]).astype(np.int32)
        labels = np.concatenate([np.full(len(p), -100), r]).astype(np.int32)
        out.append({"input_ids": ids, "labels": labels, "prompt_len": len(p)})
    return out


def _model(tiny_dir, arch, method):
    model = from_pretrained(tiny_dir(arch), progress=False)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8), rngs=nnx.Rngs(0))
    elif method == "prompt":
        model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=3), rngs=nnx.Rngs(0))
    elif method == "prefix":
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=3), rngs=nnx.Rngs(0))
    return model


CASES = [("mistral", None), ("gemma2", None), ("gpt2", None),
         ("llama", "lora"), ("qwen2", "prompt"), ("llama", "prefix")]


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_generation_from_the_loss_pass_equals_generate(tiny_dir, arch, method):
    model = _model(tiny_dir, arch, method)
    ex = _examples()
    ids = jnp.asarray(np.stack([np.pad(e["input_ids"], (0, 16 - len(e["input_ids"])))
                                for e in ex]))
    train_briefly(model, "causal_lm", ids, (ids != 0).astype(jnp.int32), steps=1)
    batch = collate(ex, length=16, batch_size=6, pad_id=0)  # one padding row
    prompt_len = np.ones(6, np.int32)
    prompt_len[:5] = [e["prompt_len"] for e in ex]
    graphdef, trainable, frozen = split_model(model)
    step = scored_generation(graphdef, max_new_tokens=4)
    data = {k: jnp.asarray(v) for k, v in batch.items()}
    sums, tokens, lengths = step(trainable, frozen, data, prompt_len,
                                 np.asarray([EOS], np.int32), np.int32(0))
    want = make_eval_step(graphdef, task="causal_lm")(trainable, frozen, data)
    assert float(sums["targets"]) == float(want["targets"]) == 15
    assert float(sums["correct"]) == float(want["correct"])
    assert abs(float(sums["loss_sum"]) - float(want["loss_sum"])) <= 1e-5 * float(want["loss_sum"])
    for e, row, n in zip(ex, np.asarray(tokens), np.asarray(lengths)):
        alone = generate(model, [e["input_ids"][:e["prompt_len"]].tolist()], max_new_tokens=4,
                         eos_token_id=EOS, pad_token_id=0, bucket=None)
        assert row[:n].tolist() == alone.sequences()[0], (arch, method)
