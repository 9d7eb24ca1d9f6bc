"""LongLoRA: S2-Attn equals attention under its group masks (plain-jnp reference: per-head
masks, half the heads shifted by half a group), one group equals full attention, the train
step uses it only while training, and position interpolation via ``config_overrides`` gives
transformers' logits for the same RoPE scaling."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax.models import _attention as L


def _reference(q, k, v, mask, group, scale, shift=True):
    """Softmax attention with an explicit [H, T, T] mask per head: heads < H/2 see their
    group i // g, the others the group of the position shifted by half a group."""
    B, T, H, D = q.shape
    K = k.shape[2]
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    i = np.arange(T)
    plain = (i[:, None] // group) == (i[None, :] // group)
    s = group // 2
    shifted = (((i - s) % T)[:, None] // group) == (((i - s) % T)[None, :] // group)
    out = np.zeros_like(q)
    for h in range(H):
        m = mask & (plain if h < H // 2 or not shift else shifted)[None]
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h]) * scale
        scores = np.where(m, scores, np.finfo(np.float32).min)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", p, v[:, :, h])
    return out


@pytest.fixture(scope="module")
def qkv():
    rs = np.random.RandomState(0)
    B, T, H, K, D = 2, 16, 4, 2, 8
    q, k, v = (rs.normal(size=(B, T, n, D)).astype(np.float32) for n in (H, K, K))
    valid = np.ones((B, T), bool)
    valid[1, :3] = False  # left padding in row 1
    mask = np.asarray(L.attention_mask(jnp.broadcast_to(jnp.arange(T), (B, T)),
                                       jnp.asarray(valid), causal=True, window=None))
    return q, k, v, mask


@pytest.mark.parametrize("group", [4, 8])
def test_s2_attention_equals_the_group_mask_reference(qkv, group):
    q, k, v, mask = qkv
    got = L.s2_attention(*map(jnp.asarray, (q, k, v, mask)), group=group, scale=0.3)
    want = _reference(q, k, v, mask, group, 0.3)
    real = mask.any(-1)  # padding queries see nothing: any distribution is as good
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-6)
    # the shifted heads differ from the unshifted grouping (the shift is real)
    unshifted = _reference(q, k, v, mask, group, 0.3, shift=False)
    assert np.abs(np.asarray(got)[real] - unshifted[real]).max() > 1e-3


def test_one_group_is_full_attention_and_only_inside_the_context(qkv):
    q, k, v, mask = map(jnp.asarray, qkv)
    full = L.dot_product_attention(q, k, v, mask, scale=0.3)
    with L.shifted_sparse_attention(1.0):
        one_group = L.dot_product_attention(q, k, v, mask, scale=0.3)
    with L.shifted_sparse_attention(0.25):
        quarter = L.dot_product_attention(q, k, v, mask, scale=0.3)
        with pytest.raises(ValueError, match="must be an even number of tokens"):
            L.dot_product_attention(q[:, :15], k[:, :15], v[:, :15], mask[:, :15, :15],
                                    scale=0.3)
    real = np.asarray(mask).any(-1)
    np.testing.assert_allclose(np.asarray(one_group)[real], np.asarray(full)[real], atol=2e-6)
    assert np.abs(np.asarray(quarter)[real] - np.asarray(full)[real]).max() > 1e-2


def test_train_step_trains_with_s2_and_evaluates_with_full_attention(tiny_dir):
    import optax

    from peftjax.models import from_pretrained
    from peftjax.procedures import LongLoraConfig
    from peftjax.train import make_eval_step, make_train_step, split_model
    from peftjax.tuners import LoraConfig, get_peft_model
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                           rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = split_model(model)
    ids = jnp.asarray(np.random.RandomState(1).randint(1, 160, (2, 16)))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    opt = optax.sgd(0.0)  # no update: the step's loss is the model's loss on the batch
    losses = {}
    for ratio in (None, 1.0, 0.25):
        ctx = None if ratio is None else LongLoraConfig(group_size_ratio=ratio).training_context
        step = make_train_step(graphdef, opt, task="causal_lm", context=ctx)
        tr = jax.tree.map(jnp.copy, trainable)
        _, _, metrics = step(tr, opt.init(tr), frozen, batch, None)
        losses[ratio] = float(metrics["loss"])
    assert losses[1.0] == pytest.approx(losses[None], abs=1e-5)
    assert abs(losses[0.25] - losses[None]) > 1e-4
    sums = make_eval_step(graphdef, task="causal_lm")(trainable, frozen, batch)
    assert float(sums["loss_sum"] / sums["targets"]) == pytest.approx(losses[None], abs=1e-5)


def test_position_interpolation_through_config_overrides(tiny_dir, tmp_path):
    """``config_overrides`` (linear RoPE scaling x2) gives transformers' logits for a config
    with the same scaling, and the saved model keeps it."""
    import torch
    import transformers as T

    from peftjax.models import from_pretrained, save_pretrained
    scaling = {"rope_type": "linear", "factor": 2.0}
    model = from_pretrained(tiny_dir("llama"), progress=False,
                            config_overrides={"rope_scaling": scaling})
    ids = np.random.RandomState(2).randint(1, 160, (1, 40))
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    plain = np.asarray(from_pretrained(tiny_dir("llama"), progress=False)(jnp.asarray(ids)).logits)
    cfg = T.AutoConfig.from_pretrained(tiny_dir("llama"))
    cfg.rope_scaling = scaling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = T.AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), config=cfg,
                                                    attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert np.abs(ours - plain).max() > 1e-3  # the scaling changes the model
    save_pretrained(model, str(tmp_path / "saved"))
    saved = json.load(open(os.path.join(tmp_path, "saved", "config.json")))
    assert saved["rope_scaling"]["factor"] == 2.0


def test_longlora_config(tmp_path):
    from peftjax.config import ConfigError, load_config
    from peftjax.procedures import LongLoraConfig
    base = ("model:\n  path: x\n  task: causal_lm\n  config_overrides: {rope_scaling: {rope_type: "
            "linear, factor: 2.0}}\npeft: {method: lora, modules_to_save: [embed_tokens, norm]}\n"
            "data: {source: y, format: text, packing: true, max_length: 64}\n"
            "train: {steps: 2}\nprocedure: {method: longlora, group_size_ratio: 0.25}\n")
    path = tmp_path / "c.yaml"
    path.write_text(base)
    cfg = load_config(str(path))
    assert cfg.procedure.procedure_config() == LongLoraConfig(0.25)
    assert cfg.model.config_overrides["rope_scaling"]["factor"] == 2.0
    with pytest.raises(ConfigError, match="data length 60: shifted sparse attention"):
        load_config(str(path), ["data.max_length=60"])
    with pytest.raises(ConfigError, match="does not combine with prefix_tuning"):
        load_config(str(path), ["peft={method: prefix_tuning, num_virtual_tokens: 4}"])
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
        load_config(str(path), ["procedure.group_size_ratio=0"])
    shipped = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                       "smollm2_longlora.yaml"))
    assert shipped.procedure.method == "longlora" and L.s2_group_size(
        shipped.data.max_length, shipped.procedure.procedure_config().group_size_ratio) == 4096
