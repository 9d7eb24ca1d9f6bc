"""peftjax.models._remat: the block call's XLA:CPU workarounds change no value and do what they
are for (the planner's per-layer memory is tested in tests/train/test_plan.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peftjax import LoraConfig, get_peft_model
from peftjax.models import _remat
from peftjax.models import from_pretrained
from peftjax.train import make_train_step, set_remat, split_model
from tests.conftest import batch


def _bert_step(tiny_dir, quirks: bool, remat: str, monkeypatch):
    """(bytes the compiled step accesses, loss, updated adapters) with the CPU workarounds on or
    off; a post-norm BERT, where the residual stream's gradient is a long elementwise
    chain."""
    monkeypatch.setattr(_remat, "_compiler_quirks", lambda: quirks)
    base = from_pretrained(tiny_dir("bert", "sequence_classification"),
                           task="sequence_classification", progress=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "query", "key", "value", "dense"], modules_to_save=["classifier"]), rngs=nnx.Rngs(0))
    set_remat(model, remat)
    graphdef, trainable, frozen = split_model(model)
    ids, mask = batch(lengths=(16, 12, 9, 16), seed=1)
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray([0, 1, 1, 0])}
    optimizer = optax.sgd(0.5)
    step = make_train_step(graphdef, optimizer, task="sequence_classification")
    opt_state = optimizer.init(trainable)
    compiled = step.lower(trainable, opt_state, frozen, data, None).compile()
    accessed = compiled.cost_analysis()["bytes accessed"]
    trainable, _, metrics = compiled(trainable, opt_state, frozen, data, None)
    return accessed, float(metrics["loss"]), [np.asarray(x) for x in jax.tree.leaves(trainable)]


def test_cotangent_wall_stops_the_fusion_recomputing_every_block_above(tiny_dir, monkeypatch):
    """XLA:CPU's fusion duplicated the residual stream's elementwise gradient chain into every
    block's backward fusion; with each block's incoming cotangent materialised the step reads
    far less (XLA's own cost analysis) and computes the same numbers."""
    off = _bert_step(tiny_dir, False, "none", monkeypatch)
    on = _bert_step(tiny_dir, True, "none", monkeypatch)
    print(f"bytes accessed: {off[0]:,.0f} without the wall, {on[0]:,.0f} with it")
    assert on[0] < 0.9 * off[0]
    assert on[1] == off[1]
    for a, b in zip(on[2], off[2]):
        np.testing.assert_array_equal(a, b)


def test_remat_ties_change_no_value(tiny_dir, monkeypatch):
    """The ties add -0.0 (and 0, and xor False): loss and updated adapters are bit for bit the
    same with the workarounds on and off."""
    off = _bert_step(tiny_dir, False, "full", monkeypatch)
    on = _bert_step(tiny_dir, True, "full", monkeypatch)
    assert on[1] == off[1]
    for a, b in zip(on[2], off[2]):
        np.testing.assert_array_equal(a, b)
