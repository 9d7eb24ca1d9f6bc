"""Surgical fine-tuning: ``rank_layers`` equals the relative gradient norms PyTorch computes for
the same BERT and batch; the procedure from YAML trains only the chosen blocks (LoRA, (IA)³,
full fine-tuning), scales learning rates by the scores, and eval/resume see the same blocks."""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.config import ConfigError, load_config
from peftjax.procedures import SurgicalConfig, rank_layers
from peftjax.train._optim import make_optimizer
from tests.train.test_run import tiny_bert, write_config  # noqa: F401  (fixture)

QUIET = dict(progress=False, print_fn=lambda *a: None)


def test_rank_layers_equals_torch_relative_gradient_norms(tiny_bert):  # noqa: F811
    import torch
    import transformers as T

    from peftjax.models import from_pretrained
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(2):
        ids = rs.randint(1000, 30000, (4, 12)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, 8:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids),
                        "labels": rs.randint(0, 2, (4,)).astype(np.int32)})
    model = from_pretrained(tiny_bert, task="sequence_classification", progress=False)
    rows = rank_layers(model, batches, task="sequence_classification")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = T.BertForSequenceClassification.from_pretrained(tiny_bert).eval()
    grads = {n: torch.zeros_like(p) for n, p in hf.named_parameters()}
    for b in batches:
        hf.zero_grad()
        out = hf(input_ids=torch.from_numpy(b["input_ids"]).long(),
                 attention_mask=torch.from_numpy(b["attention_mask"]).long(),
                 token_type_ids=torch.from_numpy(b["token_type_ids"]).long())
        torch.nn.functional.cross_entropy(out.logits, torch.from_numpy(b["labels"]).long()
                                          ).backward()
        for n, p in hf.named_parameters():
            grads[n] += p.grad / len(batches)
    assert [r["name"] for r in rows] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    for r in rows:
        names = [n for n in grads if n.startswith(r["name"] + ".")]
        g = float(torch.sqrt(sum((grads[n] ** 2).sum() for n in names)))
        w = float(torch.sqrt(sum((dict(hf.named_parameters())[n].detach() ** 2).sum()
                                 for n in names)))
        assert r["grad_norm"] == pytest.approx(g, rel=1e-4)
        assert r["weight_norm"] == pytest.approx(w, rel=1e-5)
        assert r["rgn"] == pytest.approx(g / w, rel=1e-4)
    assert max(r["score"] for r in rows) == 1.0


def test_learning_rate_scales_multiply_the_updates():
    cfg = SurgicalConfig(top_k=1, auto_lr=True, block_scores=(0.5, 1.0),
                         blocks=("enc.layer.0", "enc.layer.1"))
    params = {"enc": {"layer": {0: {"w": jnp.ones((3, 3))}, 1: {"w": jnp.ones((3, 3))}}},
              "head": {"w": jnp.ones((3, 2))}}
    scales = cfg.learning_rate_scales(params)
    assert scales == {"enc": {"layer": {0: {"w": 0.5}, 1: {"w": 1.0}}}, "head": {"w": 1.0}}
    from peftjax.config import OptimizerConfig
    plain = make_optimizer(OptimizerConfig(learning_rate=0.1))
    scaled = make_optimizer(OptimizerConfig(learning_rate=0.1), lr_scales=scales)
    grads = jax.tree.map(lambda x: x * 0.3, params)
    u1, _ = plain.update(grads, plain.init(params), params)
    u2, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(u2["enc"]["layer"][0]["w"], 0.5 * u1["enc"]["layer"][0]["w"])
    np.testing.assert_allclose(u2["head"]["w"], u1["head"]["w"])
    assert SurgicalConfig(top_k=1).learning_rate_scales(params) is None  # auto_lr off


def test_surgical_lora_from_yaml_trains_the_top_block_only(tiny_bert, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file

    from peftjax.train._run import evaluate_checkpoint, run_training
    cfg_path, out = write_config(
        tmp_path, tiny_bert, "surgical", train={"steps": 3, "save_every": 3},
        procedure={"method": "surgical", "top_k": 1, "auto_lr": True, "score_batches": 2})
    cfg = load_config(cfg_path)
    lines = []
    summary = run_training(cfg, progress=False, print_fn=lines.append)
    text = "\n".join(lines)
    assert "layer ranking (relative gradient norm over 2 batches" in text, text
    ranking = json.load(open(os.path.join(out, "layer_ranking.json")))
    scores = [r["score"] for r in ranking["ranking"]]
    best = int(np.argmax(scores))
    assert ranking["chosen"] == [best] and f"blocks [{best}] of 2 train" in text
    saved = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    blocks = {k.split("layer.")[1].split(".")[0] for k in saved if "lora_" in k}
    assert blocks == {str(best)}
    adapter_cfg = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert adapter_cfg["layers_to_transform"] == [best]  # PEFT reads the choice as it is
    # eval rebuilds the same model from the run's config and ranking (no new scoring)
    result = evaluate_checkpoint(load_config(os.path.join(out, "config.yaml")), split="test",
                                 progress=False)
    assert result["accuracy"] == summary["test"]["accuracy"]
    # the resolved config carries the scores the learning rates were scaled by
    from peftjax.train._run import prepared
    resolved = prepared(cfg, print_fn=lambda *a: None).procedure.procedure_config()
    assert resolved.block_scores == pytest.approx(tuple(scores))


@pytest.mark.parametrize("method", ["full", "ia3"])
def test_surgical_first_block_full_and_ia3(tiny_bert, tmp_path, method):  # noqa: F811
    """``select: first`` (no scoring pass): full fine-tuning changes block 0 and the classifier
    only; (IA)³ puts vectors into block 0 only (PEFT's exclude_modules regex)."""
    from safetensors.numpy import load_file

    from peftjax.train._run import run_training
    peft = {"method": method} if method == "full" else {
        "method": "ia3", "modules_to_save": ["classifier"]}
    cfg_path, out = write_config(
        tmp_path, tiny_bert, method, train={"steps": 2, "save_every": None},
        procedure={"method": "surgical", "select": "first", "top_k": 1})
    import yaml
    raw = yaml.safe_load(open(cfg_path))
    raw["peft"] = peft
    open(cfg_path, "w").write(yaml.safe_dump(raw))
    run_training(load_config(cfg_path), **QUIET)
    assert not os.path.exists(os.path.join(out, "layer_ranking.json")) or json.load(
        open(os.path.join(out, "layer_ranking.json")))["ranking"] is None
    if method == "full":
        new = load_file(os.path.join(out, "model", "model.safetensors"))
        base = load_file(os.path.join(tiny_bert, "model.safetensors"))
        changed = {k for k in base if not np.array_equal(new[k], base[k])}
        assert changed and all(k.startswith(("bert.encoder.layer.0.", "classifier."))
                               for k in changed), sorted(changed)
        assert any(k.startswith("classifier.") for k in changed)
        # export of the run's checkpoint: the same weights, in Hugging Face format
        from peftjax.cli import main
        assert main(["export", cfg_path, "--out", str(tmp_path / "exported"),
                     "--no-progress"]) == 0
        exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
        assert sorted(exported) == sorted(new)
        assert all(np.array_equal(exported[k], new[k]) for k in new)
    else:
        saved = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
        vectors = [k for k in saved if "ia3_l" in k]
        assert vectors and all(".layer.0." in k for k in vectors), vectors


def test_surgical_config_errors(tiny_bert, tmp_path):  # noqa: F811
    cfg_path, _ = write_config(tmp_path, tiny_bert, "bad")

    def error(*overrides):
        with pytest.raises(ConfigError) as e:
            load_config(cfg_path, ["procedure.method=surgical", *overrides])
        return str(e.value)

    assert "set top_k" in error()
    assert "select='best' must be one of" in error("procedure.top_k=1", "procedure.select=best")
    assert "peft.layers_to_transform is set" in error("procedure.top_k=1",
                                                      "peft.layers_to_transform=[0]")
    assert "does not target blocks" in error(
        "procedure.top_k=1", "peft={method: prompt_tuning, num_virtual_tokens: 4}")
    assert "does not target blocks" in error("procedure.top_k=1", "peft={method: head}")


def test_a_fresh_run_ranks_anew_and_a_resumed_one_reuses_the_record(tiny_bert, tmp_path):  # noqa: F811
    """The ranking file is the run's record: resume/eval/export read it, a run that starts
    at step 0 writes a new one (a stale file from an earlier run is not reused)."""
    from peftjax.models import abstract_model
    cfg_path, out = write_config(tmp_path, tiny_bert, "record",
                                 procedure={"method": "surgical", "select": "last", "top_k": 1})
    cfg = load_config(cfg_path)
    os.makedirs(out)
    stale = {"select": "rgn", "top_k": 1, "chosen": [0], "blocks": ["x.0", "x.1"],
             "ranking": [{"block": 0, "score": 1.0}, {"block": 1, "score": 0.5}]}
    json.dump(stale, open(os.path.join(out, "layer_ranking.json"), "w"))

    def load_model(*, abstract):
        return abstract_model(tiny_bert, task="sequence_classification")

    proc = cfg.procedure.procedure_config()
    kw = dict(load_model=load_model, batches=None, print_fn=lambda *a: None)
    reused = proc.prepare(cfg, **kw, fresh=False)
    assert reused.procedure.procedure_config().block_scores == (1.0, 0.5)  # the record
    anew = proc.prepare(cfg, **kw, fresh=True)
    assert anew.procedure.procedure_config().block_scores is None  # select last: no scoring
    assert anew.peft.options["layers_to_transform"] == [1]
    assert json.load(open(os.path.join(out, "layer_ranking.json")))["select"] == "last"
    # resuming with select: rgn on a record written without scores is refused, with the fix
    rgn = SurgicalConfig(select="rgn", top_k=1)
    with pytest.raises(ValueError, match="does not hold scores for this model's 2 blocks"):
        rgn.prepare(cfg, **kw, fresh=False)
