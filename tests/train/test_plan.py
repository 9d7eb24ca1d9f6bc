"""Dry runs of the Hub recipe configs, offline, against the models' published config.json."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from peftjax.config import load_config
from peftjax.train._plan import dry_run, format_plan, memory_plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUB = os.path.join(REPO, "tests", "data", "hub_configs")

# (recipe, config.json, total base parameters, LoRA r=16 all-linear parameters: PEFT's counts)
RECIPES = [
    ("llama3.1-8b_lora.yaml", "Llama-3.1-8B-Instruct.json", 8_030_261_248, 41_943_040),
    ("qwen2.5-7b_lora.yaml", "Qwen2.5-7B-Instruct.json", 7_615_616_512, 40_370_176),
    ("gemma2-2b_lora.yaml", "gemma-2-2b-it.json", 2_614_341_888, 20_766_720),
]


@pytest.mark.parametrize("recipe, hub_json, base, lora", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe_dry_run(recipe, hub_json, base, lora, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(os.path.join(HUB, hub_json), model_dir / "config.json")
    cfg = load_config(os.path.join(REPO, "configs", "recipes", recipe), [f"model.path={model_dir}"])
    # Counting only: compiling a 26-32 layer train step takes minutes on a 2-core CPU (measured:
    # gemma2-2b at 16x1024, 137 s); the tiny dry run in test_run.py covers the compile path.
    compile_it = os.environ.get("PEFTJAX_COMPILE_RECIPES") == "1"
    report = dry_run(cfg, compile=compile_it)
    print(format_plan(report))
    assert report["trainable"] == lora
    assert report["total"] == base + lora
    assert report["frozen_bytes"] == 2 * base  # bf16
    assert report["optimizer_bytes"] == 2 * 4 * lora + 8  # AdamW moments in f32 + step counts
    if compile_it:
        assert report["temp_bytes"] > 0 and report["total_bytes"] >= report["frozen_bytes"]


@pytest.mark.parametrize("plan", ["llama2-7b_lora.yaml", "llama2-7b_qlora.yaml"])
def test_full_remat_keeps_about_a_block_input_per_layer(plan, tmp_path):
    """With ``remat: full`` each added layer keeps its block input, not its weights in compute
    form (before peftjax.models._remat: one layer's weights in float32 per layer, the f32
    convert of bf16 / the dequantized NF4 weight, merged by XLA:CPU's CSE) nor its activations
    (LoRA's weight-gradient products postponed by the scheduler)."""
    with open(os.path.join(REPO, "configs", "memory", "llama-2-7b-hf", "config.json")) as f:
        shape = json.load(f)
    shape.update(hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=2048)
    T, E = 256, shape["hidden_size"]
    acts = {}
    for n in (2, 4):
        d = tmp_path / f"l{n}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": n}))
        cfg = load_config(os.path.join(REPO, "configs", "memory", plan),
                          [f"model.path={d}", f"data.max_length={T}", f"data.buckets=[{T}]"])
        acts[n] = memory_plan(cfg)["activation_bytes"]
    per_layer = (acts[4] - acts[2]) / 2
    block_input = T * E * 2  # bf16 [1, T, E]
    layer_f32 = 4 * (4 * E * E + 3 * E * shape["intermediate_size"])
    print(f"{plan}: activations {acts}; per added layer {per_layer / 2**20:.3f} MiB "
          f"(block input {block_input / 2**20:.3f} MiB, the layer's weights in f32 "
          f"{layer_f32 / 2**20:.1f} MiB)")
    assert per_layer <= 3 * block_input
