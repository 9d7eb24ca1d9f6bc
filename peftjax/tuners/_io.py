"""PEFT-format adapter files, for every method: ``adapter_config.json`` +
``adapter_model.safetensors``, written by peftjax or PyTorch PEFT, read by either.

The method comes from ``peft_type``; its config's ``peft_entries`` names every tensor (PEFT's
keys and layouts). Loading is strict: every tensor in the file must land in the model and every
adapter tensor of the model must be in the file, with the same shape; otherwise nothing is
loaded, the error lists the missing/unexpected keys, and the base model is left as it was.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._safetensors import CheckpointError, SafetensorsFile, save_file
from peftjax.tuners._base import TunerConfig, config_for_peft_type
from peftjax.tuners._peft_model import PeftModel, get_peft_model

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_tensors(model: PeftModel) -> dict[str, np.ndarray]:
    """The trainable state of ``model`` under PEFT's key names and layouts."""
    tensors = {}
    for key, (var, transposed) in model.peft_config.peft_entries(model).items():
        a = np.asarray(var[...])
        tensors[key] = np.ascontiguousarray(a.T if transposed else a)
    return tensors


def save_adapter(model: PeftModel, directory: str) -> None:
    """Writes ``model``'s adapter in PEFT's format (files written atomically)."""
    os.makedirs(directory, exist_ok=True)
    save_file(adapter_tensors(model), os.path.join(directory, WEIGHTS_FILE))
    tmp = os.path.join(directory, CONFIG_FILE + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(model.peft_config.to_peft_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str) -> TunerConfig:
    """The adapter config in ``directory``, as the registered method's config class."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; expected a PEFT adapter directory "
                              f"({CONFIG_FILE} + {WEIGHTS_FILE}).")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from e
    try:
        cls = config_for_peft_type(data.get("peft_type", "LORA"), path)
        return cls.from_peft_dict(data, path)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{e}" if str(e).startswith(path) else f"{path}: {e}") from e


def stored_weights(directory: str) -> tuple[SafetensorsFile, str]:
    """The adapter's tensor file in ``directory`` (opened lazily) and its path."""
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (adapter_model.bin is not read; "
                              "re-save it with safe_serialization=True).")
    return SafetensorsFile(weights_path), weights_path


def load_adapter(base: nnx.Module, directory: str, adapter_name: str = "default") -> PeftModel:
    """Adds the adapter stored in ``directory`` to ``base`` (in place) and loads its tensors."""
    config = read_config(directory)
    stored, weights_path = stored_weights(directory)
    model = get_peft_model(base, config.for_loading(), rngs=nnx.Rngs(0),
                           adapter_name=adapter_name)
    try:
        fill_adapter(model, stored, weights_path)
    except Exception:
        model.unload()  # leave the caller's base model as it was
        raise
    model._set_config(adapter_name, config.resolved(model.base_model))
    return model


def fill_adapter(model: PeftModel, stored: SafetensorsFile, weights_path: str) -> None:
    """Writes the stored tensors into the active adapter, strictly (see the module doc)."""
    entries = model.peft_config.peft_entries(model)
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
