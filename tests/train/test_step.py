"""The trainable/frozen split, the optimizer and the jitted train/eval steps.

References: transformers' own losses for the loss functions; the same step without
accumulation / remat for accumulation and remat (float32, tolerance 1e-6 relative to the values
involved); closed forms for the schedules and optimizer-state sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from peftjax import LoraConfig, count_parameters, get_peft_model
from peftjax.models import from_pretrained
from peftjax.train import (IGNORE_INDEX, OptimizerConfig, make_eval_step, make_optimizer,
                           make_schedule, make_train_step, sequence_classification_loss,
                           set_remat, split_model, summarize, token_classification_loss)
from peftjax.tuners import LoraParam
from tests.conftest import batch, hf_class, hf_positions


def _lm_batch(lengths=(12, 9, 7, 12), seed=0, prompt=3):
    ids, mask = batch(lengths=lengths, seed=seed)
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[:, :prompt] = IGNORE_INDEX  # a "prompt" whose tokens are not targets
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels)}


def _lora(tiny_dir, arch="llama", task="causal_lm", **cfg):
    base = from_pretrained(tiny_dir(arch, task), task=task, progress=False)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **cfg}
    return get_peft_model(base, LoraConfig(**cfg), rngs=nnx.Rngs(0))


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _flat(state):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def test_optimizer_state_only_for_trainable_and_frozen_untouched(tiny_dir):
    model = _lora(tiny_dir, "qwen2", "sequence_classification", modules_to_save=["score"],
                  bias="lora_only")
    graphdef, trainable, frozen = split_model(model)
    assert all(isinstance(v, LoraParam) or p[-2:] in (("score", "kernel"),) or p[-1] == "bias"
               for p, v in nnx.to_flat_state(trainable))
    n_trainable, n_total = count_parameters(model)
    assert sum(x.size for x in jax.tree.leaves(trainable)) == n_trainable
    assert sum(x.size for x in jax.tree.leaves(frozen)) == n_total - n_trainable
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.01))
    opt_state = optimizer.init(trainable)
    # AdamW keeps mu and nu per trainable leaf plus scalar step counters, nothing for frozen
    arrays = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    scalars = [x for x in jax.tree.leaves(opt_state) if x.ndim == 0]
    print(f"trainable {_nbytes(trainable)} B, frozen {_nbytes(frozen)} B, "
          f"AdamW state {_nbytes(arrays)} B + {_nbytes(scalars)} B of scalars")
    assert _nbytes(arrays) == 2 * _nbytes(trainable)
    assert _nbytes(scalars) == 8  # int32 step counts of Adam and of the schedule
    frozen_before, trainable_before = _flat(frozen), _flat(trainable)
    step = make_train_step(graphdef, optimizer, task="sequence_classification")
    ids, mask = batch(lengths=(10, 6, 8, 10))
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray([0, 1, 1, 0])}
    losses = []
    for i in range(4):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, data, None)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for p, v in _flat(frozen).items():
        np.testing.assert_array_equal(v, frozen_before[p])   # bit-identical
    after = _flat(trainable)
    assert all(np.abs(after[p] - trainable_before[p]).max() > 0 for p in after)


def test_train_step_donates_and_writes_back(tiny_dir):
    model = _lora(tiny_dir)
    graphdef, trainable, frozen = split_model(model)
    optimizer = make_optimizer()
    opt_state = optimizer.init(trainable)
    old = jax.tree.leaves(trainable)
    step = make_train_step(graphdef, optimizer, task="causal_lm")
    trainable, opt_state, _ = step(trainable, opt_state, frozen, _lm_batch(), jax.random.key(0))
    assert all(x.is_deleted() for x in old)         # buffers reused for the result
    nnx.update(model, trainable)
    q_proj = model.base_model.model.layers[0].self_attn.q_proj
    assert np.abs(np.asarray(q_proj.lora["default"].lora_B[...])).max() > 0


def test_causal_lm_loss_matches_transformers(tiny_dir):
    """Mean over target tokens with prompt and padding ignored, as transformers computes it."""
    path = tiny_dir("llama")
    model = _lora(tiny_dir)
    graphdef, trainable, frozen = split_model(model)
    data = _lm_batch()
    sums = make_eval_step(graphdef, task="causal_lm")(trainable, frozen, data)
    ours = summarize(sums, task="causal_lm")
    hf = hf_class("llama", "causal_lm").from_pretrained(path).eval()
    mask = np.asarray(data["attention_mask"])
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(np.asarray(data["input_ids"]).astype(np.int64)),
                  attention_mask=torch.tensor(mask), position_ids=torch.tensor(hf_positions(mask)),
                  labels=torch.tensor(np.asarray(data["labels"]).astype(np.int64))).loss.item()
    n_targets = int((np.asarray(data["labels"])[:, 1:] != IGNORE_INDEX).sum())
    print(f"causal LM loss ours {ours['loss']:.6f} transformers {want:.6f}")
    assert ours["targets"] == n_targets
    assert abs(ours["loss"] - want) <= 1e-5
    assert abs(ours["perplexity"] - np.exp(want)) <= 1e-4 * np.exp(want)


def test_sequence_classification_loss_matches_transformers(tiny_dir):
    path = tiny_dir("bert", "sequence_classification")
    model = _lora(tiny_dir, "bert", "sequence_classification", target_modules=["query"])
    graphdef, trainable, frozen = split_model(model)
    ids, mask = batch(lengths=(10, 6, 8))
    labels = np.array([1, 0, 1])
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(labels)}
    ours = summarize(make_eval_step(graphdef, task="sequence_classification")(trainable, frozen, data),
                     task="sequence_classification")
    hf = hf_class("bert", "sequence_classification").from_pretrained(path).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 labels=torch.tensor(labels))
    acc = float((out.logits.argmax(-1).numpy() == labels).mean())
    assert abs(ours["loss"] - out.loss.item()) <= 1e-5
    assert ours["accuracy"] == acc


def test_gradient_accumulation_equals_one_big_batch(tiny_dir):
    results = []
    for accum in (1, 2, 4):
        graphdef, trainable, frozen = split_model(_lora(tiny_dir))
        before = _flat(trainable)
        optimizer = optax.sgd(1.0)  # the update is the gradient itself
        opt_state = optimizer.init(trainable)
        step = make_train_step(graphdef, optimizer, task="causal_lm", accum_steps=accum)
        trainable, _, metrics = step(trainable, opt_state, frozen, _lm_batch(), None)
        after = _flat(trainable)
        results.append((float(metrics["loss"]), {k: after[k] - before[k] for k in after}))
    (loss1, g1), *others = results
    # float32 sums in another order: the gradients agree to 5e-6 of their largest entry
    # (measured on an AMD EPYC: largest update 0.44, largest difference 1.1e-6 = 2.5e-6 of it)
    tol = 5e-6 * max(np.abs(v).max() for v in g1.values())
    worst = max(np.abs(g[k] - g1[k]).max() for _, g in others for k in g1)
    print(f"largest update {tol / 5e-6:.3g}; accumulated vs one batch: max diff {worst:.2e}")
    for loss, g in others:
        assert abs(loss - loss1) <= 1e-6 * abs(loss1)
        for k in g1:
            np.testing.assert_allclose(g[k], g1[k], rtol=0, atol=tol)


def test_remat_policies_same_loss_and_grads(tiny_dir):
    ref = None
    for policy in ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                   "save:attn_out,mlp_hidden"):
        model = _lora(tiny_dir, "gemma2")
        set_remat(model, policy)
        graphdef, trainable, frozen = split_model(model)
        optimizer = optax.sgd(1.0)
        step = make_train_step(graphdef, optimizer, task="causal_lm")
        trainable, _, metrics = step(trainable, optimizer.init(trainable), frozen, _lm_batch(),
                                     None)
        got = (float(metrics["loss"]), _flat(trainable))
        if ref is None:
            ref = got
            continue
        assert abs(got[0] - ref[0]) <= 1e-6 * abs(ref[0]), policy
        for k in ref[1]:
            np.testing.assert_allclose(got[1][k], ref[1][k], rtol=0, atol=1e-6, err_msg=policy)


def test_remat_lowers_compiled_temp_memory(tiny_dir):
    """XLA's own buffer assignment: rematerialising blocks needs fewer temporaries."""
    temps = {}
    ids = np.random.default_rng(0).integers(3, 160, (4, 256))
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((4, 256), jnp.int32),
            "labels": jnp.asarray(ids)}
    for policy in ("none", "dots_saveable", "full"):
        model = _lora(tiny_dir)
        set_remat(model, policy)
        graphdef, trainable, frozen = split_model(model)
        optimizer = make_optimizer()
        step = make_train_step(graphdef, optimizer, task="causal_lm")
        compiled = step.lower(trainable, optimizer.init(trainable), frozen, data, None).compile()
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
    print("compiled temp bytes by remat policy:", temps)
    assert temps["full"] < 0.8 * temps["none"]
    assert temps["dots_saveable"] < temps["none"]


def test_mixed_precision_bf16_compute_f32_adapters(tiny_dir):
    base = from_pretrained(tiny_dir("llama"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           progress=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                           rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = split_model(model)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    opt_state = optimizer.init(trainable)
    assert {x.dtype for x in jax.tree.leaves(opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    step = make_train_step(graphdef, optimizer, task="causal_lm")
    graphdef32, trainable32, frozen32 = split_model(_lora(tiny_dir))
    ref = summarize(make_eval_step(graphdef32, task="causal_lm")(trainable32, frozen32, _lm_batch()),
                    task="causal_lm")["loss"]
    losses = []
    for i in range(5):
        trainable, opt_state, m = step(trainable, opt_state, frozen, _lm_batch(), None)
        losses.append(float(m["loss"]))
    assert abs(losses[0] - ref) <= 2e-2 * ref     # bf16 rounding of the same model
    assert losses[-1] < losses[0]
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}


def test_dropout_key_drives_train_step(tiny_dir):
    """At step 0 LoRA's B is zero, so LoRA dropout shows in B's gradient (SGD with lr 1:
    the update is minus the gradient): a key fixes the mask, another key changes it."""
    def updated(rng):
        graphdef, trainable, frozen = split_model(_lora(tiny_dir, lora_dropout=0.3))
        step = make_train_step(graphdef, optax.sgd(1.0), task="causal_lm")
        return _flat(step(trainable, optax.sgd(1.0).init(trainable), frozen, _lm_batch(), rng)[0])

    a, a_again, b, none = (updated(k) for k in (jax.random.key(1), jax.random.key(1),
                                                 jax.random.key(2), None))
    key = next(k for k in a if k[-1] == "lora_B")
    np.testing.assert_array_equal(a[key], a_again[key])
    assert np.abs(a[key] - b[key]).max() > 1e-4
    assert np.abs(a[key] - none[key]).max() > 1e-4


def test_schedules_closed_form():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10, total_steps=110,
                          final_lr_ratio=0.1)
    s = make_schedule(cfg)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-7 and abs(float(s(10)) - 1.0) < 1e-7
    assert abs(float(s(60)) - (0.1 + 0.9 * 0.5)) < 1e-6 and abs(float(s(110)) - 0.1) < 1e-6
    lin = make_schedule(OptimizerConfig(learning_rate=2.0, schedule="linear", total_steps=100))
    assert abs(float(lin(25)) - 1.5) < 1e-6 and float(lin(100)) == 0.0
    assert float(make_schedule(OptimizerConfig(learning_rate=3.0))(1000)) == 3.0


def test_clipping_bounds_the_gradient():
    params = {"w": jnp.ones((3, 3))}
    grads = {"w": jnp.full((3, 3), 100.0)}
    opt = make_optimizer(OptimizerConfig(learning_rate=1.0, max_grad_norm=0.5, b1=0.9))
    _, state = opt.update(grads, opt.init(params), params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    # the first moment after one step is (1 - b1) * the (clipped) gradient
    assert abs(float(optax.tree.norm(adam.mu)) / 0.1 - 0.5) < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="cosine"), "schedule='cosine' needs total_steps"),
    (dict(schedule="step"), "schedule='step' must be one of constant, linear, cosine"),
    (dict(learning_rate=0.0), "learning_rate=0.0 must be > 0"),
    (dict(schedule="linear", warmup_steps=10, total_steps=5), "total_steps=5 must exceed"),
])
def test_optimizer_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        OptimizerConfig(**kwargs)


def test_step_errors(tiny_dir):
    model = _lora(tiny_dir)
    graphdef, trainable, frozen = split_model(model)
    with pytest.raises(ValueError, match="task='seq2seq' has no training loss"):
        make_train_step(graphdef, make_optimizer(), task="seq2seq")
    step = make_train_step(graphdef, optax.sgd(0.1), task="causal_lm", accum_steps=3)
    with pytest.raises(ValueError, match="batch size 4 is not divisible by accum_steps=3"):
        step(trainable, optax.sgd(0.1).init(trainable), frozen, _lm_batch(), None)
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        set_remat(model, "some")
    with pytest.raises(ValueError, match="names must be a comma-separated subset"):
        set_remat(model, "save:attn")


def test_token_classification_and_regression_losses_closed_form():
    rs = np.random.RandomState(0)
    logits = rs.randn(2, 4, 3).astype(np.float32)
    labels = np.array([[0, 2, IGNORE_INDEX, 1], [1, IGNORE_INDEX, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])  # the last token of row 1 is padding
    loss_sum, n, correct = token_classification_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                     jnp.asarray(mask))
    keep = (labels != IGNORE_INDEX) & (mask == 1)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -sum(logp[b, t, labels[b, t]] for b, t in zip(*np.nonzero(keep)))
    assert int(n) == keep.sum() == 5 and abs(float(loss_sum) - want) <= 1e-5
    assert int(correct) == sum(logits[b, t].argmax() == labels[b, t] for b, t in zip(*np.nonzero(keep)))
    # one output: regression with squared error, as transformers' num_labels=1
    pred, target = np.array([[0.5], [2.0], [-1.0]], np.float32), np.array([1.0, 2.0, 0.0])
    loss_sum, n, _ = sequence_classification_loss(jnp.asarray(pred), jnp.asarray(target))
    assert int(n) == 3 and abs(float(loss_sum) - (0.25 + 0.0 + 1.0)) <= 1e-6
