"""Run-config validation: unknown keys, bad values, overrides, round trip."""

from __future__ import annotations

import os

import pytest

from peftjax.config import ConfigError, config_from_dict, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def minimal(**extra):
    raw = {"model": {"path": "some/model"}, "data": {"source": "data.jsonl"},
           "train": {"steps": 10}}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return raw


@pytest.mark.parametrize("section, key, suggestion", [
    ("train", "learning_rate", "lr"), ("train", "max_steps", "steps"), ("train", "batchsize", "batch_size"),
    ("peft", "lora_alpah", "lora_alpha"), ("peft", "target_module", "target_modules"),
    ("data", "max_len", "max_length"), ("model", "dtpye", "dtype"),
])
def test_unknown_key_names_closest(section, key, suggestion):
    with pytest.raises(ConfigError) as e:
        config_from_dict(minimal(**{section: {key: 1}}))
    msg = str(e.value)
    assert f"'{section}.{key}'" in msg and f"'{suggestion}'" in msg, msg


def test_unknown_section():
    raw = minimal()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        config_from_dict(raw)


@pytest.mark.parametrize("section, key, value, expect", [
    ("train", "lr", -1.0, "lr=-1.0 must be > 0"),
    ("train", "batch_size", "eight", "expected an integer"),
    ("train", "accum_steps", 3, "divide batch_size=8"),
    ("train", "schedule", "exp", "must be one of"),
    ("train", "remat", "sometimes", "unknown remat policy"),
    ("peft", "r", 0, "r=0 must be a positive integer"),
    ("peft", "lora_dropout", 1.5, "lora_dropout=1.5 must be in [0, 1)"),
    ("peft", "qalora_group_size", 0, "qalora_group_size=0 must be a positive integer"),
    ("peft", "method", "prefix", "must be one of"),
    ("data", "format", "csv", "must be one of"),
    ("data", "buckets", [64, 32], "increasing"),
    ("model", "dtype", "fp8", "must be one of"),
    ("mesh", "data", 0, "sizes must be positive"),
])
def test_bad_values_name_the_accepted_range(section, key, value, expect):
    with pytest.raises(ConfigError) as e:
        config_from_dict(minimal(**{section: {key: value}}))
    assert expect in str(e.value) and section in str(e.value), str(e.value)


def test_quantization_section_int4():
    cfg = config_from_dict(minimal(quantization={"quant_type": "int4", "blocksize": 32}))
    assert cfg.quantization.quant_config().double_quant is False
    assert config_from_dict(minimal(quantization={"quant_type": "nf4"})).quantization \
        .quant_config().double_quant is True
    with pytest.raises(ConfigError, match="quantization.*blocksize=48 \\(the int4 group size"):
        config_from_dict(minimal(quantization={"quant_type": "int4", "blocksize": 48}))
    with pytest.raises(ConfigError, match="double_quant applies to NF4/FP4"):
        config_from_dict(minimal(quantization={"quant_type": "int4", "double_quant": True}))


def test_overrides_apply_and_validate(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "quickstart.yaml"),
                      ["train.lr=1e-4", "peft.r=16", "data.buckets=[64]", "output_dir=/tmp/x"])
    assert cfg.train.lr == 1e-4 and cfg.peft.tuner_config().r == 16
    assert cfg.data.buckets == (64,) and cfg.output_dir == "/tmp/x"
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(os.path.join(CONFIGS, "quickstart.yaml"), ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(os.path.join(CONFIGS, "quickstart.yaml"), ["train.lr"])


def test_round_trip_and_yaml_errors(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "quickstart.yaml"))
    assert config_from_dict(cfg.to_dict()) == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="no 'train' section"):
        config_from_dict({"model": {"path": "m"}, "data": {"source": "d"}})


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")) +
                         sorted("recipes/" + f for f in os.listdir(os.path.join(CONFIGS, "recipes"))
                                if f.endswith(".yaml")))
def test_shipped_configs_validate(name):
    load_config(os.path.join(CONFIGS, name))


def test_optimizer_keys_are_typed_and_checked_against_steps():
    """The train section's OptimizerConfig keys go through the same type checks as its own."""
    cfg = config_from_dict(minimal(train={"weight_decay": "1e-2", "schedule": "cosine",
                                          "warmup_steps": 3}))  # YAML 1.1 reads 1e-2 as a string
    opt = cfg.train.optimizer_config(10)
    assert opt.weight_decay == 0.01 and opt.schedule == "cosine" and opt.total_steps == 10
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="train.warmup_steps=2.5: expected an integer"):
        config_from_dict(minimal(train={"warmup_steps": 2.5}))
    with pytest.raises(ConfigError, match="total_steps=10 must exceed warmup_steps=10"):
        config_from_dict(minimal(train={"schedule": "linear", "warmup_steps": 10}))


def test_peft_section_dispatches_on_the_method():
    from peftjax import LoraConfig, PromptTuningConfig
    cfg = config_from_dict(minimal(peft={"method": "prompt_tuning", "num_virtual_tokens": 8,
                                         "prompt_tuning_init": "SAMPLE_VOCAB"}))
    assert cfg.peft.tuner_config() == PromptTuningConfig(num_virtual_tokens=8,
                                                         prompt_tuning_init="SAMPLE_VOCAB")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(config_from_dict(minimal()).peft.tuner_config(), LoraConfig)
    assert config_from_dict(minimal(peft={"method": "full"})).peft.tuner_config() is None
    with pytest.raises(ConfigError, match=r"unknown key 'peft.num_virtual_token'; did you mean "
                                          r"'num_virtual_tokens'"):
        config_from_dict(minimal(peft={"method": "prompt_tuning", "num_virtual_token": 8}))
    with pytest.raises(ConfigError, match=r"unknown key 'peft.r'"):  # a LoRA key elsewhere
        config_from_dict(minimal(peft={"method": "prompt_tuning", "r": 8}))
    with pytest.raises(ConfigError, match=r"num_virtual_tokens=0 must be a positive integer"):
        config_from_dict(minimal(peft={"method": "prompt_tuning", "num_virtual_tokens": 0}))
    with pytest.raises(ConfigError,
                       match=r"method='boft' must be one of \(.*'ia3'.*'lora'.*'vera'"):
        config_from_dict(minimal(peft={"method": "boft"}))  # a PEFT method peftjax lacks


@pytest.mark.parametrize("peft", [
    {"method": "lora", "lora_dropout": 0.1}, {"method": "vera", "vera_dropout": 0.05},
    {"method": "bottleneck", "dropout": 0.1}])
def test_adapter_dropout_without_a_dropout_key_is_refused(peft):
    """train.dropout=false gives the step no dropout key: an adapter dropout would be ignored."""
    name, value = next((k, v) for k, v in peft.items() if k != "method")
    with pytest.raises(ConfigError, match=f"peft.{name}={value} would do nothing"):
        config_from_dict(minimal(peft=peft, train={"dropout": False}))
    config_from_dict(minimal(peft=peft, train={"dropout": True}))
    config_from_dict(minimal(peft={**peft, name: 0.0}, train={"dropout": False}))
