"""Notebooks run top to bottom on CPU at small size, so they never rot."""

from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_qlora_notebook(tiny_llama_with_real_tokenizer, tmp_path):
    ns = run_notebook(os.path.join(REPO, "notebooks", "qlora_colab.ipynb"), {
        "PEFTJAX_NB_MODEL": tiny_llama_with_real_tokenizer, "PEFTJAX_NB_STEPS": "8",
        "PEFTJAX_NB_BATCH": "4", "PEFTJAX_NB_EVAL": "8", "PEFTJAX_NB_BLOCKSIZE": "32",
        "PEFTJAX_NB_OUT": str(tmp_path)})
    from peftjax.quant._linear import QuantizedLinear
    # every linear layer of the 2 blocks is 4-bit: mlp, q/o, k/v (GQA); the tied head is not
    assert ns["n_4bit"] == 2 * (3 * 32 * 64 + 2 * 32 * 32 + 2 * 16 * 32), ns["n_4bit"]
    losses = ns["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert float(ns["same"]) < 1e-5
    assert 0.0 <= ns["accuracy"] <= 1.0
    reports = ns["reports"]  # every linear layer was adapted and re-quantized
    assert len(reports) == 14 and all(0 < r["rel_fro"] < 0.2 and r["of_delta"] > 0
                                      for r in reports.values())
    assert 0 < ns["requant_change"]
    assert isinstance(ns["merged4"].model.layers[0].mlp.up_proj, QuantizedLinear)
    assert not isinstance(ns["merged"].model.layers[0].mlp.up_proj, QuantizedLinear)
    assert json.load(open(tmp_path / "merged" / "config.json")).get("quantization_config") is None
    q = json.load(open(tmp_path / "merged-4bit" / "config.json"))["quantization_config"]
    assert q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
