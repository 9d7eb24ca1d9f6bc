"""Each bad input gets an error that names the problem and the fix (the messages are checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from peftjax.models import CheckpointError, UnsupportedConfigError, from_pretrained
from peftjax.models._safetensors import SafetensorsFile, save_file


@pytest.fixture
def llama_copy(tiny_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_dir("llama"), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(path, fn):
    f = SafetensorsFile(str(path / "model.safetensors"))
    tensors = {k: np.array(f[k]) for k in f}
    del f
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unknown_model_type(llama_copy):
    _edit_config(llama_copy, model_type="falcon")
    with pytest.raises(UnsupportedConfigError, match=r"model_type='falcon' is not supported; "
                       r"supported: .*gemma.*llama.*qwen3"):
        from_pretrained(str(llama_copy), progress=False)


@pytest.mark.parametrize("key,value,match", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
     r"rope type 'yarn' is not supported; supported: default, linear, llama3"),
    ("hidden_act", "mish", r"hidden_act='mish' is not supported; supported: .*silu"),
    ("pretraining_tp", 2, r"pretraining_tp=2 is not supported.*set it to 1"),
])
def test_unsupported_config_values(llama_copy, key, value, match):
    _edit_config(llama_copy, **{key: value})
    with pytest.raises(UnsupportedConfigError, match=match):
        from_pretrained(str(llama_copy), progress=False)


def test_unknown_config_key_is_warned(llama_copy):
    _edit_config(llama_copy, fancy_new_switch=True)
    with pytest.warns(UserWarning, match="fancy_new_switch"):
        from_pretrained(str(llama_copy), progress=False)


def test_missing_weights_are_listed(llama_copy):
    _rewrite_weights(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 weights the DecoderForCausalLM needs are not in "
                       r"the checkpoint: model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(str(llama_copy), progress=False)


def test_unexpected_backbone_weights_are_listed(llama_copy):
    def add(t):
        t["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    _rewrite_weights(llama_copy, add)
    with pytest.raises(CheckpointError, match=r"1 checkpoint weights have no place in the model: "
                       r"model\.layers\.0\.self_attn\.extra_proj\.weight"):
        from_pretrained(str(llama_copy), progress=False)


def test_buffers_ignored_and_other_heads_only_warned(llama_copy, caplog):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)
    _rewrite_weights(llama_copy, add)
    model = from_pretrained(str(llama_copy), task="sequence_classification", progress=False)
    assert "lm_head.weight" in caplog.text  # another task's head: reported, not fatal
    assert "newly initialised" in caplog.text and "score.weight" in caplog.text
    assert model.score.kernel[...].shape == (64, 2)
    assert float(np.abs(np.asarray(model.score.kernel[...])).sum()) > 0


def test_shape_mismatch_names_both_shapes(llama_copy):
    _edit_config(llama_copy, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"weight model\.layers\.0\.mlp\.gate_proj\.weight: "
                       r"checkpoint shape \(96, 64\) but the config implies \(80, 64\)"):
        from_pretrained(str(llama_copy), progress=False)


def test_truncated_file(llama_copy):
    f = llama_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: os.path.getsize(f) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* the file is truncated"):
        from_pretrained(str(llama_copy), progress=False)


def test_corrupt_header(llama_copy):
    f = llama_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"header is not valid JSON.*corrupt"):
        from_pretrained(str(llama_copy), progress=False)


def test_tiny_file(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"too short to be safetensors"):
        from_pretrained(str(llama_copy), progress=False)


def test_missing_shard(tiny_dir, tmp_path):
    import transformers as T
    T.AutoModelForCausalLM.from_pretrained(tiny_dir("llama")).save_pretrained(
        str(tmp_path), max_shard_size="40KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.startswith("model-"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=rf"shard files that are missing: .*{shard}"):
        from_pretrained(str(tmp_path), progress=False)


def test_only_pytorch_bin(llama_copy):
    os.remove(llama_copy / "model.safetensors")
    (llama_copy / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin.*convert"):
        from_pretrained(str(llama_copy), progress=False)


def test_paths(tmp_path, llama_copy):
    with pytest.raises(CheckpointError, match="no such directory"):
        from_pretrained(str(tmp_path / "nope"), progress=False)
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match="is a file; pass the directory"):
        from_pretrained(str(llama_copy / "config.json"), progress=False)
    with pytest.raises(CheckpointError, match="no installed package 'not_a_pkg_xyz'"):
        from_pretrained("pkg:not_a_pkg_xyz/model", progress=False)


def test_hub_id_offline_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"'someone/some-model' is not a local directory and "
                       r"could not be fetched from the Hugging Face Hub"):
        from_pretrained("someone/some-model", progress=False)


def test_unknown_task(tiny_dir):
    with pytest.raises(ValueError, match="task='masked_lm' is not available for llama; choose one "
                       "of causal_lm, sequence_classification, token_classification, features"):
        from_pretrained(tiny_dir("llama"), task="masked_lm", progress=False)


def test_loading_and_generation_never_import_torch(tiny_dir):
    code = (
        "import sys, peftjax\n"
        f"m = peftjax.models.from_pretrained({tiny_dir('llama')!r}, progress=False)\n"
        "print(peftjax.generate(m, [[3, 4, 5]], max_new_tokens=3).tokens.tolist())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
