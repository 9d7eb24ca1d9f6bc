"""Notebooks run top to bottom on CPU at small size, so they never rot."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_llama_with_real_tokenizer(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template."""
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


def run_notebook(path: str, env: dict) -> dict:
    nb = json.load(open(path))
    ns: dict = {}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("!", "%")) for line in src.splitlines()), \
                f"cell {i}: shell/magic lines must stay commented so the notebook runs as Python"
            exec(compile(src, f"{os.path.basename(path)}[cell {i}]", "exec"), ns)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ns


def test_quickstart_notebook(tiny_llama_with_real_tokenizer, tmp_path):
    ns = run_notebook(os.path.join(REPO, "notebooks", "quickstart.ipynb"), {
        "PEFTJAX_NB_MODEL": tiny_llama_with_real_tokenizer, "PEFTJAX_NB_STEPS": "8",
        "PEFTJAX_NB_BATCH": "4", "PEFTJAX_NB_EVAL": "8", "PEFTJAX_NB_OUT": str(tmp_path)})
    losses = ns["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert float(ns["same"]) < 1e-5
    assert 0.0 <= ns["accuracy"] <= 1.0
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "merged" / "config.json")
    # the adapter the notebook saved also works from the command line
    from tests.train.test_run import cli
    proc = cli("generate", "--model", tiny_llama_with_real_tokenizer, "--adapter",
               str(tmp_path / "adapter"), "--chat", "--max-new-tokens", "4",
               "Is this movie review positive or negative?\nReview: Great fun.", check=0)
    assert proc.stdout.startswith("### Is this movie review") and proc.stdout.count("###") == 1
