"""``train.scan_layers``: identical blocks run as one ``lax.scan``; the train step computes what
the unrolled stack computes (losses, updated adapters, dropout masks), with one compiled block."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peftjax import LoraConfig, PrefixTuningConfig, get_peft_model
from peftjax.models import _remat, from_pretrained
from peftjax.train import ScanLayout, make_train_step, set_remat, set_scan_layers, split_model
from tests.conftest import batch, tiny_configs

LAYERS = 5


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """``deep_dir(arch)``: a tiny random model of ``LAYERS`` blocks (Gemma 3 alternating local
    and global layers, whose rotary tables differ: a period-2 pattern)."""
    import torch
    import transformers as T
    made = {}

    def make(arch: str) -> str:
        if arch not in made:
            cfg = tiny_configs()[arch]
            cfg.pad_token_id = 0
            setattr(cfg, "n_layer" if arch == "gpt2" else "num_hidden_layers", LAYERS)
            if arch == "gemma3":
                cfg.layer_types = ["sliding_attention", "full_attention"] * 2 + [
                    "sliding_attention"]
            cls = (T.AutoModelForSequenceClassification if arch == "bert"
                   else T.AutoModelForCausalLM)
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls.from_config(cfg)
            path = str(tmp_path_factory.mktemp(arch))
            model.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make


TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"],
           "gemma3": ["q_proj", "v_proj"]}


def _step(path: str, arch: str, scan: bool, config=None, remat: str = "full",
          stacked: bool = False):
    """(loss, updated trainables, lowered program text, compiled temporaries in bytes, the
    layout) of one SGD step with dropout on. ``stacked``: the frozen weights of the scanned
    blocks held stacked (``ScanLayout``), as runs hold them."""
    task = "sequence_classification" if arch == "bert" else "causal_lm"
    base = from_pretrained(path, task=task, progress=False)
    config = config or LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                  lora_dropout=0.3, init_lora_weights=False)
    model = get_peft_model(base, config, rngs=nnx.Rngs(0))
    set_remat(model, remat)
    if scan:
        set_scan_layers(model)
    graphdef, trainable, frozen = split_model(model)
    ids, mask = batch(lengths=(16, 12, 9, 16), seed=1)
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray([0, 1, 1, 0]) if arch == "bert" else jnp.asarray(ids)}
    optimizer = optax.sgd(0.5)
    opt_state = optimizer.init(trainable)
    rng = jax.random.key(7)
    layout = ScanLayout.find(graphdef, trainable, frozen, data, task=task) if stacked else None
    if stacked:
        frozen = layout.stack(frozen)
    lowered = make_train_step(graphdef, optimizer, task=task, layout=layout).lower(
        trainable, opt_state, frozen, data, rng)
    compiled = lowered.compile()
    trainable, _, metrics = compiled(trainable, opt_state, frozen, data, rng)
    return (float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(trainable)],
            lowered.as_text(), compiled.memory_analysis().temp_size_in_bytes, layout)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "bert"])
def test_scanned_stack_trains_as_the_unrolled_one(deep_dir, arch):
    """Same loss and updated LoRA factors (model dropout and LoRA dropout on, full remat) with
    the blocks scanned; the scanned program holds the block once (a loop, far fewer matrix
    products). Tolerance 1e-6: XLA compiles the loop body as a program of its own."""
    path = deep_dir(arch)
    unrolled, scanned = _step(path, arch, False), _step(path, arch, True)
    assert scanned[0] == pytest.approx(unrolled[0], rel=1e-6, abs=1e-6)
    for a, b in zip(scanned[1], unrolled[1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # loops: the scans (forward and backward) beside random bits' own
    assert scanned[2].count("stablehlo.while") >= unrolled[2].count("stablehlo.while") + 2
    dots = [t.count("stablehlo.dot_general") for t in (unrolled[2], scanned[2])]
    assert dots[1] < 0.7 * dots[0], dots


def test_blocks_that_differ_run_unrolled_around_the_scanned_run(deep_dir):
    """LoRA on block 0 only: blocks 1-4 are identical and scanned, block 0 runs on its own;
    and a prefix (one key/value pair per block, stacked for the scan) trains the same."""
    path = deep_dir("llama")
    some = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0],
                      init_lora_weights=False)
    prefix = PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    for config in (some, prefix):
        unrolled = _step(path, "llama", False, config)
        scanned = _step(path, "llama", True, config)
        assert scanned[0] == pytest.approx(unrolled[0], rel=1e-6, abs=1e-6)
        for a, b in zip(scanned[1], unrolled[1]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert scanned[2].count("stablehlo.while") >= unrolled[2].count("stablehlo.while") + 2


@pytest.mark.parametrize("arch, blocks", [("llama", {5}), ("gemma3", {2})])
def test_weights_held_stacked_train_the_same_without_the_copy(deep_dir, arch, blocks):
    """``ScanLayout``: the scanned blocks' frozen weights held stacked (Gemma 3's period-2
    stack: rows of blocks 0, 2 and 1, 3; block 4 unrolled, not stacked) train exactly as when
    the step stacks them, with fewer temporaries (the per-step copy is gone); ``unstack``
    gives the per-block weights back."""
    path = deep_dir(arch)
    in_step = _step(path, arch, True)
    held = _step(path, arch, True, stacked=True)
    layout = held[4]
    assert layout.groups and {len(g) for g in layout.groups} == blocks
    assert held[0] == in_step[0]
    for a, b in zip(held[1], in_step[1]):
        np.testing.assert_array_equal(a, b)
    assert held[3] < in_step[3], (held[3], in_step[3])

    model = get_peft_model(from_pretrained(path, progress=False),
                           LoraConfig(r=2, target_modules=["q_proj"]), rngs=nnx.Rngs(0))
    set_scan_layers(model)
    graphdef, trainable, frozen = split_model(model)
    ids, mask = batch(lengths=(8, 6), seed=2)
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(ids)}
    layout = ScanLayout.find(graphdef, trainable, frozen, data, task="causal_lm")
    per_block = [np.asarray(a) for a in jax.tree.leaves(frozen)]
    originals = jax.tree.leaves(frozen)
    stacked = layout.stack(frozen, delete=True)
    assert sum(a.is_deleted() for a in originals) == sum(len(g) for g in layout.groups)
    for a, b in zip(jax.tree.leaves(layout.unstack(stacked)), per_block):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match="not the ones the layout was found for"):
        layout.stack(trainable)


def test_repeats_split_a_stack_into_scannable_runs():
    """Periodic stacks scan as super-blocks of their period (the remainder unrolled); other
    stacks as runs of equal neighbours."""
    assert _remat._repeats(list("aaaaa")) == [(0, 1, 5)]
    assert _remat._repeats(list("ababa")) == [(0, 2, 2), (4, 1, 1)]
    assert _remat._repeats(list("abcabc")) == [(0, 3, 2)]
    assert _remat._repeats(list("abbbb")) == [(0, 1, 1), (1, 1, 4)]
    assert _remat._repeats(list("aabbbc")) == [(0, 1, 2), (2, 1, 3), (5, 1, 1)]


def test_set_scan_layers_needs_blocks():
    with pytest.raises(ValueError, match="no transformer blocks to scan"):
        set_scan_layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_scanned_prefill_generates_the_same_tokens(deep_dir):
    """Generation with the setting on: the prefill over the cache is scanned (decode steps stay
    unrolled) and greedy decoding gives the unrolled model's tokens, a prefix in the cache too."""
    import peftjax
    path = deep_dir("llama")
    prompts = [[5, 9, 23, 4, 17, 3], [8, 2, 31]]
    for config in (None, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")):
        got = []
        for scan in (False, True):
            model = from_pretrained(path, task="causal_lm", progress=False)
            if config is not None:
                model = get_peft_model(model, config, rngs=nnx.Rngs(0))
            if scan:
                set_scan_layers(model)
            got.append(peftjax.generate(model, prompts, max_new_tokens=6, eos_token_id=None,
                                        pad_token_id=0).tokens)
        np.testing.assert_array_equal(got[1], got[0])
