"""PEFT-format LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` [r, in] and ``lora_B.weight``
[out, r]; trained biases of adapted layers as ``<module>.base_layer.bias``; other trained
parameters (``modules_to_save``, ``bias="all"``) under their Hugging Face names. A directory
written by PyTorch PEFT loads here and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._loading import hf_param_paths
from peftjax.models._safetensors import CheckpointError, SafetensorsFile, save_file
from peftjax.tuners._lora import LoraConfig
from peftjax.tuners._peft_model import PeftModel, get_peft_model

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_FIELDS = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
# PEFT fields that change the adapter's math: loading must refuse values other than these.
_MUST_BE = {"use_dora": (False, None), "lora_bias": (False, None), "layer_replication": (None,),
            "target_parameters": (None, []), "trainable_token_indices": (None,),
            "use_qalora": (False, None), "alora_invocation_tokens": (None,),
            "use_bdlora": (None, False), "megatron_config": (None,)}
# Initialisation-only or bookkeeping fields: no effect on a saved adapter's outputs.
_HARMLESS = {"inference_mode", "revision", "auto_mapping", "peft_version", "loftq_config",
             "eva_config", "corda_config", "megatron_core", "qalora_group_size", "arrow_config",
             "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config",
             "velora_config", "runtime_config"}


def _entries(model: PeftModel) -> dict[str, tuple[nnx.Variable, bool]]:
    """PEFT key -> (variable, transposed) for everything an adapter file holds: the LoRA
    factors and the trainable parameters (modules_to_save, biases). One mapping serves
    saving, checking and loading."""
    lora = dict(model.lora_layers())
    out = {}
    for name, m in lora.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = (m.lora_A, True)
        out[f"{PREFIX}{name}.lora_B.weight"] = (m.lora_B, True)
    mask = dict(nnx.to_flat_state(model.trainable_mask()))
    state = dict(nnx.to_flat_state(nnx.state(model.base_model)))
    for key, (path, transposed) in hf_param_paths(model.base_model).items():
        if mask.get(path, False):
            owner = key.rsplit(".", 1)[0]
            if owner in lora and key.endswith(".bias"):
                key = f"{owner}.base_layer.bias"  # PEFT's wrapper level
            out[PREFIX + key] = (state[path], transposed)
    return out


def adapter_tensors(model: PeftModel) -> dict[str, np.ndarray]:
    """The trainable state of ``model`` under PEFT's key names and layouts."""
    tensors = {}
    for key, (var, transposed) in _entries(model).items():
        a = np.asarray(var[...])
        tensors[key] = np.ascontiguousarray(a.T if transposed else a)
    return tensors


def save_adapter(model: PeftModel, directory: str) -> None:
    """Writes ``model``'s adapter in PEFT's format (files written atomically)."""
    os.makedirs(directory, exist_ok=True)
    cfg = model.peft_config
    data = dataclasses.asdict(cfg)
    for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
              "modules_to_save"):
        if isinstance(data[k], tuple):
            data[k] = list(data[k])
    data.update(peft_type="LORA", inference_mode=True, use_dora=False, lora_bias=False,
                layer_replication=None, revision=None)
    save_file(adapter_tensors(model), os.path.join(directory, WEIGHTS_FILE))
    tmp = os.path.join(directory, CONFIG_FILE + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str) -> LoraConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; expected a PEFT adapter directory "
                              f"({CONFIG_FILE} + {WEIGHTS_FILE}).")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from e
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type={data['peft_type']!r}; only LORA adapters load "
                              "with this function.")
    bad = {k: data[k] for k, ok in _MUST_BE.items() if k in data and data[k] not in ok}
    if bad:
        raise CheckpointError(f"{path}: uses PEFT features that change the adapter's math and are "
                              f"not implemented here: {bad}.")
    unknown = sorted(set(data) - _FIELDS - set(_MUST_BE) - _HARMLESS - {"peft_type"})
    if unknown:
        warnings.warn(f"{path}: ignoring fields {unknown} (from another PEFT version?).",
                      stacklevel=3)
    fields = {k: v for k, v in data.items() if k in _FIELDS}
    if fields.get("init_lora_weights") not in (True, False, "gaussian"):
        fields["init_lora_weights"] = True  # only the initial values differ; weights are loaded
    if isinstance(fields.get("modules_to_save"), list):  # PEFT appends head names, with repeats
        fields["modules_to_save"] = list(dict.fromkeys(fields["modules_to_save"]))
    return LoraConfig(**fields)


def load_adapter(base: nnx.Module, directory: str) -> PeftModel:
    """Injects the adapter stored in ``directory`` into ``base`` (in place) and loads it."""
    config = read_config(directory)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (adapter_model.bin is not read; "
                              "re-save it with safe_serialization=True).")
    stored = SafetensorsFile(weights_path)
    model = get_peft_model(base, config, rngs=nnx.Rngs(0))
    try:
        _fill(model, stored, weights_path)
    except Exception:
        model.unload()  # leave the caller's base model as it was
        raise
    return model


def _fill(model: PeftModel, stored: SafetensorsFile, weights_path: str) -> None:
    entries = _entries(model)
    by_name = {k.replace(".default.", "."): k for k in stored}  # very old PEFT kept the name
    missing = sorted(set(entries) - set(by_name))
    unexpected = sorted(set(by_name) - set(entries))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {unexpected[:8]}")
    if problems:
        raise CheckpointError(f"{weights_path} does not fit {type(model.base_model).__name__} with "
                              f"the config in {CONFIG_FILE}: " + "; ".join(problems) + ". Load it "
                              "onto the base model it was trained on.")
    for key, (var, transposed) in entries.items():
        want = var[...].shape[::-1] if transposed else var[...].shape
        if stored.shape(by_name[key]) != tuple(want):
            raise CheckpointError(f"{weights_path}: {key} has shape {stored.shape(by_name[key])}, "
                                  f"the model expects {tuple(want)}.")
    for key, (var, transposed) in entries.items():
        value = np.asarray(stored[by_name[key]])
        var[...] = jnp.asarray(value.T if transposed else value, var[...].dtype)
