"""Adapter files, for every method: by default PEFT's (``adapter_config.json`` +
``adapter_model.safetensors``, written by peftjax or PyTorch PEFT, read by either); a method whose
ecosystem has another layout (bottleneck adapters: AdapterHub's) says so through the config's
file-layout hooks (``weight_files``, ``file_dict``, ...; see ``_base``).

The method comes from the config file; its config's ``peft_entries`` names every tensor (the
format's keys and layouts). Loading is strict: every tensor in the files must land in the model
and every adapter tensor of the model must be in them, with the same shape; otherwise nothing is
loaded, the error lists the missing/unexpected keys, and the base model is left as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax._files import write_json
from peftjax.models._safetensors import CheckpointError, SafetensorsFile, save_file
from peftjax.tuners._base import TunerConfig, config_for_file
from peftjax.tuners._peft_model import PeftModel, get_peft_model

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_tensors(model: PeftModel) -> dict[str, np.ndarray]:
    """The trainable state of ``model`` under the file format's key names and layouts."""
    tensors = {}
    for key, (var, transposed) in model.peft_config.peft_entries(model).items():
        a = np.asarray(var[...])
        tensors[key] = np.ascontiguousarray(a.T if transposed else a)
    return tensors


def save_adapter(model: PeftModel, directory: str) -> None:
    """Writes ``model``'s active adapter in its method's format (PEFT's unless the method has
    another); every file is written atomically."""
    config = model.peft_config
    os.makedirs(directory, exist_ok=True)
    by_file: dict[str, dict] = {}
    for key, value in adapter_tensors(model).items():
        by_file.setdefault(config.weight_file(key), {})[key] = value
    for name in config.weight_files:
        if name in by_file or name == config.weight_files[0]:
            save_file(by_file.get(name, {}), os.path.join(directory, name))
        elif os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))  # a stale file from an earlier save
    for name, data in config.extra_files(model).items():
        write_json(os.path.join(directory, name), data)
    write_json(os.path.join(directory, CONFIG_FILE), config.file_dict(model))


def read_config(directory: str) -> TunerConfig:
    """The adapter config in ``directory``, as the registered method's config class."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; expected an adapter directory "
                              f"({CONFIG_FILE} + {WEIGHTS_FILE}, or AdapterHub's files).")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from e
    try:
        cls = config_for_file(data, path)
        return cls.from_peft_dict(data, path)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{e}" if str(e).startswith(path) else f"{path}: {e}") from e


class _TorchFile(Mapping):
    """A PyTorch ``state_dict`` file (``torch.load(weights_only=True)``), for formats whose
    tools write those by default; needs torch installed."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path} is a PyTorch pickle, which needs torch to read; install torch, or "
                "re-save the adapter as safetensors (AdapterHub: save_adapter(..., "
                "use_safetensors=True)).") from e
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable PyTorch state_dict ({e}).") from e
        self._arrays = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                        for k, v in state.items()}

    def __getitem__(self, name):
        return self._arrays[name]

    def shape(self, name):
        return tuple(self._arrays[name].shape)

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)


class StoredTensors(Mapping):
    """The tensors of an adapter directory, across the method's weight files."""

    def __init__(self, files: list):
        self._files = files
        self._where = {k: f for f in files for k in f}

    def __getitem__(self, name):
        return self._where[name][name]

    def shape(self, name):
        return self._where[name].shape(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def stored_weights(directory: str, config: TunerConfig | None = None) -> tuple[StoredTensors, str]:
    """The adapter's tensors in ``directory`` (opened lazily) and the main file's path."""
    config = config or TunerConfig
    names = config.weight_files
    files = []
    for i, name in enumerate(names):
        path = os.path.join(directory, name)
        fallback = config.weight_fallbacks.get(name)
        fallback = fallback and os.path.join(directory, fallback)
        if os.path.isfile(path):
            files.append(SafetensorsFile(path))
        elif fallback and os.path.isfile(fallback):
            files.append(_TorchFile(fallback))
        elif i == 0:
            raise CheckpointError(f"{directory}: no {name} (adapter_model.bin is not read; "
                                  "re-save it with safe_serialization=True)." if
                                  name == WEIGHTS_FILE else f"{directory}: no {name}.")
    return StoredTensors(files), os.path.join(directory, names[0])


def load_adapter(base: nnx.Module, directory: str, adapter_name: str = "default") -> PeftModel:
    """Adds the adapter stored in ``directory`` to ``base`` (in place) and loads its tensors."""
    config = read_config(directory)
    stored, weights_path = stored_weights(directory, config)
    model = get_peft_model(base, config.for_loading(), rngs=nnx.Rngs(0),
                           adapter_name=adapter_name)
    try:
        fill_adapter(model, stored, weights_path)
    except Exception:
        model.unload()  # leave the caller's base model as it was
        raise
    model._set_config(adapter_name, config.resolved(model.base_model))
    return model


def fill_adapter(model: PeftModel, stored: Mapping, weights_path: str) -> None:
    """Writes the stored tensors into the active adapter, strictly (see the module doc)."""
    config = model.peft_config
    entries = {config.stored_key(k): v for k, v in config.peft_entries(model).items()}
    by_name = {c: k for k in stored if (c := config.stored_key(k)) is not None}
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
