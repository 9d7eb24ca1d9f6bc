"""Dry runs of the Hub recipe configs, offline, against the models' published config.json."""

from __future__ import annotations

import os
import shutil

import pytest

from peftjax.config import load_config
from peftjax.train._plan import dry_run, format_plan

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
