"""ReLoRA: the restart keeps the outputs and grows the rank of the accumulated change, the
jagged schedule and the moment pruning as configured, and a run (in process, tiny BERT) that
resumes mid-cycle from a checkpoint ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx

from peftjax.config import ConfigError, load_config
from peftjax.procedures import ReLoraConfig, prune_by_magnitude, prune_moments
from tests.train.test_run import tiny_bert, write_config  # noqa: F401  (fixture)


def _rank(delta: np.ndarray) -> int:
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    return int((s > 1e-6 * s[0]).sum())


def test_restart_keeps_outputs_and_grows_the_rank(tiny_dir):
    from peftjax.models import from_pretrained
    from peftjax.train import split_model
    from peftjax.tuners import LoraConfig, get_peft_model
    from peftjax.tuners._lora import lora_layers
    r = 2
    model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False),
                           LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                           rngs=nnx.Rngs(0))
    name = "base_model.model.layers.0.self_attn.q_proj"
    w0 = np.array(dict(lora_layers(model))[name].kernel[...])  # a copy: restarts donate
    graphdef, trainable, frozen = split_model(model)
    run = ReLoraConfig(reset_every=5).attach(graphdef, trainable, frozen, key=jax.random.key(1))
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 160, (2, 9)))
    rng = np.random.RandomState(1)
    a_before = None
    for k in range(3):
        # stand-in for training: random B factors (A keeps its fresh initial values)
        flat = [(p, v.replace(jnp.asarray(rng.normal(size=v.shape) * 0.05, v.dtype))
                 if p[-1] == "lora_B" else v) for p, v in nnx.to_flat_state(trainable)]
        trainable = nnx.from_flat_state(flat)
        before = np.asarray(nnx.merge(graphdef, trainable, frozen)(ids).logits)
        trainable, frozen, _, record = run.boundary(5 * (k + 1), trainable, frozen,
                                                    optax.adam(1e-3).init(trainable))
        m = nnx.merge(graphdef, trainable, frozen)
        after = np.asarray(m(ids).logits)
        np.testing.assert_allclose(after, before, atol=2e-5)  # a restart changes no output
        layer = dict(lora_layers(m))[name]
        assert not np.any(np.asarray(layer.lora["default"].lora_B[...]))  # B back to zero
        a = np.asarray(layer.lora["default"].lora_A[...])
        assert a_before is None or not np.allclose(a, a_before)  # A drawn afresh
        assert np.abs(a).max() <= 1 / np.sqrt(a.shape[0])  # ... as at init (kaiming-uniform)
        a_before = a
        assert record["relora_reset"] == k + 1
        rank = _rank(np.asarray(layer.kernel[...]) - w0)
        assert rank == r * (k + 1), (k, rank)  # each restart adds up to r to W - W0


def test_jagged_schedule_and_moment_pruning():
    base = optax.constant_schedule(1.0)
    f = ReLoraConfig(reset_every=10, restart_warmup_steps=4).schedule(base)
    got = [float(f(jnp.asarray(c))) for c in (0, 9, 10, 11, 12, 13, 19, 20, 23)]
    assert got == pytest.approx([1, 1, 0.25, 0.5, 0.75, 1, 1, 0.25, 1])
    assert ReLoraConfig(reset_every=25).warmup == 3  # default: a tenth of reset_every

    x = jnp.asarray(np.random.RandomState(0).normal(size=(40, 25)), jnp.float32)
    y = np.asarray(prune_by_magnitude(x, 0.9))
    kept = np.abs(np.asarray(x))[y != 0]
    assert len(kept) == 100 and kept.min() > np.abs(np.asarray(x))[y == 0].max()
    assert not np.any(np.asarray(prune_by_magnitude(x, 1.0)))
    assert np.array_equal(np.asarray(prune_by_magnitude(x, 0.0)), np.asarray(x))

    params = {"layer": {"lora_A": x, "lora_B": x[:5]}, "classifier": {"kernel": x}}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = opt.init(params)
    _, state = opt.update(params, state, params)  # moments become non-zero
    new, kept = prune_moments(state, 0.9, lambda k: "'lora_A'" in k or "'lora_B'" in k)
    adam = new[1][0]
    assert kept == pytest.approx(0.1, abs=0.01)
    assert np.count_nonzero(adam.mu["layer"]["lora_A"]) == 100
    assert np.count_nonzero(adam.nu["layer"]["lora_B"]) <= 13
    np.testing.assert_array_equal(adam.mu["classifier"]["kernel"],
                                  state[1][0].mu["classifier"]["kernel"])  # not a factor: kept


def _relora_config(tmp_path, model_dir, **mesh):
    return write_config(
        tmp_path, model_dir, "relora",
        peft={"r": 2, "target_modules": ["query", "value"]},
        train={"steps": 10, "save_every": 3, "keep_checkpoints": 5},
        procedure={"method": "relora", "reset_every": 4, "optimizer_reset_ratio": 0.9,
                   "restart_warmup_steps": 2}, **({"mesh": mesh} if mesh else {}))


def _resume_from_six(tmp_path, cfg_path, out):
    """Runs the config again from its step-6 checkpoint (in a copy of the run directory);
    returns ``(summary, copy directory)``."""
    from peftjax.train._run import run_training
    copy = str(tmp_path / "resumed")
    shutil.copytree(out, copy)
    for d in ("9", "10"):
        shutil.rmtree(os.path.join(copy, "checkpoints", d))
    shutil.rmtree(os.path.join(copy, "model"))
    raw = yaml.safe_load(open(cfg_path))
    raw.update(output_dir=copy)
    raw["train"]["resume"] = True
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(raw))
    return run_training(load_config(str(tmp_path / "resume.yaml")), progress=False,
                        print_fn=lambda *a: None), copy


def _same_files(a: str, b: str) -> None:
    from safetensors.numpy import load_file
    x, y = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (a, b))
    assert sorted(x) == sorted(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _eight_devices(model_dir: str, tmp: str) -> None:
    """(Run in a process with 8 CPU devices.) ReLoRA on a data 4 x fsdp 2 mesh: restarts keep
    the shardings, a resumed run (restored state placed on the mesh) ends bit-identical, and a
    checkpoint evaluates."""
    import pathlib

    from peftjax.train._run import evaluate_checkpoint, run_training
    tmp_path = pathlib.Path(tmp)
    cfg_path, out = _relora_config(tmp_path, model_dir, data=4, fsdp=2)
    summary = run_training(load_config(cfg_path), progress=False, print_fn=lambda *a: None)
    again, copy = _resume_from_six(tmp_path, cfg_path, out)
    _same_files(out, copy)
    result = evaluate_checkpoint(load_config(cfg_path), split="test", progress=False)
    assert result["accuracy"] == summary["test"]["accuracy"] == again["test"]["accuracy"]


def test_relora_on_eight_devices_resumes_bit_identically(tiny_bert, tmp_path):  # noqa: F811
    from tests.conftest import on_eight_devices
    on_eight_devices(f"from tests.train.test_relora import _eight_devices; "
                     f"_eight_devices({tiny_bert!r}, {str(tmp_path)!r})")


def test_relora_run_resumes_mid_cycle_bit_identically(tiny_bert, tmp_path):  # noqa: F811
    from safetensors.numpy import load_file

    from peftjax.cli import main
    from peftjax.train._run import evaluate_checkpoint, run_training
    cfg_path, out = _relora_config(tmp_path, tiny_bert)
    cfg = load_config(cfg_path)
    quiet = dict(progress=False, print_fn=lambda *a: None)
    summary = run_training(cfg, **quiet)
    assert summary["steps"] == 10
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    resets = [r for r in records if r.get("split") == "procedure"]
    assert [(r["step"], r["relora_reset"]) for r in resets] == [(4, 1), (8, 2)]
    assert all(0.05 < r["moments_kept"] < 0.15 for r in resets)
    lrs = {r["step"]: r["lr"] for r in records if "split" not in r}
    assert lrs[4] == pytest.approx(1e-2) and lrs[5] == pytest.approx(0.5e-2)  # restart warmup
    # the run saves the merged model (an adapter alone would need the merged base)
    assert os.path.isdir(os.path.join(out, "model")) and not os.path.exists(
        os.path.join(out, "adapter"))
    final = load_file(os.path.join(out, "model", "model.safetensors"))
    base = load_file(os.path.join(tiny_bert, "model.safetensors"))
    key = "bert.encoder.layer.0.attention.self.query.weight"
    rank = _rank(final[key] - base[key])
    assert 2 < rank <= 6, rank  # resets at 4 and 8 and the final merge: up to 3 r

    # resume from step 6 (after the reset at 4: the checkpoint must hold the merged kernels)
    again, copy = _resume_from_six(tmp_path, cfg_path, out)
    assert again["steps"] == 10
    _same_files(out, copy)
    assert {k: v for k, v in again["test"].items() if k != "seconds"} == {
        k: v for k, v in summary["test"].items() if k != "seconds"}

    # eval and export of a mid-cycle checkpoint use the merged kernels it holds
    result = evaluate_checkpoint(cfg, split="test", progress=False)
    assert result["accuracy"] == summary["test"]["accuracy"]
    assert main(["export", cfg_path, "--out", str(tmp_path / "exported"), "--step", "6",
                 "--no-progress"]) == 0
    six = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert not np.array_equal(six[key], base[key]) and not np.array_equal(six[key], final[key])


def test_relora_config_errors(tiny_bert, tmp_path):  # noqa: F811
    cfg_path, _ = write_config(tmp_path, tiny_bert, "bad")

    def error(*overrides):
        with pytest.raises(ConfigError) as e:
            load_config(cfg_path, list(overrides))
        return str(e.value)

    assert "reset_every=None must be an integer >= 1" in error("procedure.method=relora")
    assert "did you mean 'reset_every'" in error("procedure.method=relora",
                                                 "procedure.reset_evry=5")
    msg = error("procedure.method=relorra")
    assert "method='relorra' must be one of" in msg and "'relora'" in msg
    assert "set procedure.method first" in error("procedure.reset_every=5")
    msg = error("procedure.method=relora", "procedure.reset_every=5", "peft.use_dora=true")
    assert "peft.use_dora is set" in msg
    msg = error("procedure.method=relora", "procedure.reset_every=5",
                "quantization.quant_type=nf4")
    assert "set quantization.quant_type: null" in msg
    msg = error("procedure.method=relora", "procedure.reset_every=5", "peft={method: ia3}")
    assert "ReLoRA restarts LoRA adapters; peft.method is 'ia3'" in msg
    assert "restart_warmup_steps=9 must be in [1, reset_every]" in error(
        "procedure.method=relora", "procedure.reset_every=5", "procedure.restart_warmup_steps=9")


def test_relora_with_scanned_blocks_holds_the_weights_stacked(tiny_bert, tmp_path,  # noqa: F811
                                                              capsys):
    """``train.scan_layers``: the run holds the scanned blocks' frozen weights stacked (a
    ``ScanLayout``, the per-block arrays freed) through ReLoRA's resets, an evaluation inside
    the run, checkpoints and the end: the saved merged model equals the unrolled run's within
    float rounding (XLA compiles the scanned block as a program of its own), and a run resumed
    mid-cycle ends bit-identical to the uninterrupted scanned run."""
    from safetensors.numpy import load_file

    from peftjax.train._run import run_training
    quiet = dict(progress=False, print_fn=print)
    runs = {}
    for scan in (False, True):
        cfg_path, out = write_config(
            tmp_path, tiny_bert, f"relora_scan_{scan}",
            peft={"r": 2, "target_modules": ["query", "value"]},
            train={"steps": 10, "save_every": 3, "keep_checkpoints": 5, "eval_every": 5,
                   "scan_layers": scan},
            procedure={"method": "relora", "reset_every": 4, "optimizer_reset_ratio": 0.9,
                       "restart_warmup_steps": 2})
        runs[scan] = (cfg_path, out, run_training(load_config(cfg_path), **quiet))
    (_, plain, plain_summary), (cfg_path, out, summary) = runs[False], runs[True]

    def validation_at_five(run_dir):
        return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
                if r.get("split") == "validation" and r["step"] == 5]
    # every frozen leaf of the 2 encoder blocks (the adapted kernels too: LoRA's base)
    assert ("scan_layers: 16 frozen weights held stacked over 2 scanned blocks"
            in capsys.readouterr().out)
    assert summary["steps"] == 10
    # the evaluation inside the run (on a per-block copy of the stacked weights)
    (scanned_eval,), (plain_eval,) = validation_at_five(out), validation_at_five(plain)
    assert scanned_eval["loss"] == pytest.approx(plain_eval["loss"], rel=1e-5)
    x, y = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (plain, out))
    assert sorted(x) == sorted(y)
    for k in x:  # (measured: 1.3e-6 relative at most)
        np.testing.assert_allclose(y[k], x[k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert summary["test"]["accuracy"] == plain_summary["test"]["accuracy"]
    _, copy = _resume_from_six(tmp_path, cfg_path, out)
    _same_files(out, copy)
