"""Tied-LoRA (Renduchintala et al. 2024, "Tied-LoRA: Enhancing parameter efficiency of LoRA with
weight tying"): LoRA whose low-rank factors are shared by every layer, with per-layer scaling
vectors, and a choice of which of the four parts train.

For each module type (a targeted layer's name after its block index: ``self_attn.q_proj``) one
``A`` [r, in] and one ``B`` [out, r] are shared by all layers of that type; each adapted layer has
its own ``u`` [r] and ``v`` [out]:

    y = x W + b + (alpha / r) * v * ((u * (dropout(x) A^T)) B^T)

``trainable`` says which of ``A``, ``B``, ``u``, ``v`` train; the others stay at their initial
values. With all four (the default) an adapter has ``sum over types (r * in + out * r)`` shared
plus ``L_type * (r + out)`` per-layer parameters, against LoRA's ``L_type * r * (in + out)``.
``("u", "v")`` over frozen random factors is VeRA's construction (``VeraConfig`` is the PEFT-
compatible form of that); ``("A", "B")`` is LoRA with one pair of factors for all layers.

Initial values: ``A`` kaiming-uniform (LoRA's), ``u`` one. If ``v`` trains it starts at zero and
``B`` is random (kaiming-uniform), otherwise ``v`` is one and ``B`` zero: either way the model
starts as the base model. A configuration in which neither ``B`` nor ``v`` trains could never
move away from the base model and is refused.

Files: PEFT has no Tied-LoRA, so the adapter is stored in peftjax's own format (``peft_type``
``"TIED_LORA"`` in ``adapter_config.json``); ``adapter_model.safetensors`` holds the shared
factors once, ``base_model.tied_lora.<type>.lora_A`` [r, in] / ``.lora_B`` [out, r], and per
layer ``base_model.model.<module>.tied_lora_u`` [r] / ``.tied_lora_v`` [out]. For other tools,
:func:`save_as_lora` writes the same adapter as a plain PEFT LoRA file (``A_l = u_l * A``,
``B_l = v_l * B``, same r and alpha: identical outputs), which PyTorch PEFT and vLLM load.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._layers import param_value
from peftjax.tuners._base import PREFIX, AdapterParam, TunerConfig, register
from peftjax.tuners._layer import LayerMethod, adapted_layers, site_of, wrap
from peftjax.tuners._lora import DEFAULT_LORA_TARGETS
from peftjax.tuners._targets import find_targets, get_submodule
from peftjax.tuners._vera import ScaledSharedFactors, ScaledSharedMixin

PARTS = ("A", "B", "u", "v")
BIAS_MODES = ("none", "all", "tied_lora_only")


class TiedLoraParam(AdapterParam):
    """Tied-LoRA's leaves: the shared factors and the per-layer vectors (a part that does not
    train carries the metadata ``frozen``)."""


def _uniform(key, shape, bound) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class SharedFactors(nnx.Module):
    """One module type's ``lora_A`` [r, in] and ``lora_B`` [out, r], shared by its layers."""

    def __init__(self, A_RxI: jax.Array, B_OxR: jax.Array, axes_IO: tuple):
        in_axis, out_axis = axes_IO
        self.lora_A = TiedLoraParam(A_RxI, axes=("lora_rank", in_axis))
        self.lora_B = TiedLoraParam(B_OxR, axes=(out_axis, "lora_rank"))


class TiedVectors(ScaledSharedFactors):
    """One adapter's ``tied_lora_u`` [r] and ``tied_lora_v`` [out] in one layer, and a reference
    to its module type's shared factors."""

    def __init__(self, shared: SharedFactors, u: jax.Array, v: jax.Array, *, scaling: float,
                 dropout: float, site: int, out_axis, factors_train: bool):
        self.shared = shared
        self.scaling, self.dropout_rate, self.site = float(scaling), float(dropout), site
        self.factors_train = factors_train
        self.tied_lora_u = TiedLoraParam(u, axes=("lora_rank",))
        self.tied_lora_v = TiedLoraParam(v, axes=(out_axis,))

    def factors(self, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
        return param_value(self.shared.lora_A), param_value(self.shared.lora_B)

    def scales(self) -> tuple[jax.Array, jax.Array]:
        return param_value(self.tied_lora_u), param_value(self.tied_lora_v)


class TiedLoraMixin(ScaledSharedMixin):
    """Named Tied-LoRA adapters on a linear layer: ``tied_lora[name]``."""

    store = "tied_lora"


def module_type(name: str) -> str:
    """The module type whose layers share factors: the layer's name after its block index
    (``self_attn.q_proj``; BERT's ``attention.output.dense`` and ``output.dense`` are two)."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[idx[-1] + 1:]) if idx else name


def _slot(kind: str) -> str:
    """The key of a module type's factors in the model state (no dots in state keys)."""
    return kind.replace(".", "__")


@register
@dataclasses.dataclass(frozen=True)
class TiedLoraConfig(LayerMethod, TunerConfig):
    """Tied-LoRA (see the module doc). Field names follow ``LoraConfig`` where they mean the
    same: ``r``, ``lora_alpha`` (scaling alpha / r), ``lora_dropout``, ``target_modules`` (None:
    PEFT's LoRA default for the family), ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``modules_to_save``, ``fan_in_fan_out``, ``bias`` (``"none"``, ``"all"``
    or ``"tied_lora_only"``), ``task_type``. ``trainable``: which of ``"A"``, ``"B"``, ``"u"``,
    ``"v"`` train (the paper's configurations; default all four). ``init_weights=False`` starts
    ``v`` and ``B`` random too, so the adapter changes the outputs at once (for tests)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None
    trainable: Any = PARTS
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    method = "tied_lora"
    peft_type = "TIED_LORA"
    layer_mixin = TiedLoraMixin
    bias_modes = BIAS_MODES

    def __post_init__(self):
        problems = self.shared_problems("lora_dropout")
        trainable = self.trainable
        if isinstance(trainable, str):  # "ABuv", "uv", ...
            trainable = tuple(trainable)
        if not isinstance(trainable, (list, tuple)) or not set(trainable) <= set(PARTS) or \
                not trainable:
            problems.append(f"trainable={self.trainable!r} must name a non-empty subset of "
                            f"{PARTS}")
        else:
            object.__setattr__(self, "trainable", tuple(p for p in PARTS if p in trainable))
            if "B" not in self.trainable and "v" not in self.trainable:
                problems.append(f"trainable={self.trainable!r}: neither B nor v trains, so the "
                                "adapter's change stays zero; train B, v or both")
        if problems:
            raise ValueError("invalid TiedLoraConfig: " + "; ".join(problems) + ".")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def resolved(self, model) -> TiedLoraConfig:
        return self.with_model_defaults(model, target_modules=DEFAULT_LORA_TARGETS)

    def parameter_count(self, shapes: dict[str, list[tuple[int, int]]]) -> int:
        """The closed form of the trainable count: ``shapes`` maps each module type to its
        adapted layers' ``(in, out)``; A and B count once per type, u and v once per layer."""
        n = 0
        for layers in shapes.values():
            (i, o), count = layers[0], len(layers)
            n += ("A" in self.trainable) * self.r * i + ("B" in self.trainable) * o * self.r
            n += count * (("u" in self.trainable) * self.r + ("v" in self.trainable) * o)
        return n

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        """One pair of factors per module type (all its layers must have one shape), kept
        beside the model under ``tied_lora_factors``; per-layer vectors in the layers."""
        config = self.resolved(model)
        names = find_targets(model, config)
        by_type: dict[str, list[str]] = {}
        for n in names:
            by_type.setdefault(module_type(n), []).append(n)
        train = set(config.trainable)
        shared = {}
        for kind, members in by_type.items():
            layers = [get_submodule(model, n) for n in members]
            shapes = {(m.in_features, m.out_features) for m in layers}
            if len(shapes) > 1:
                raise ValueError(f"Tied-LoRA shares one A and B among the layers "
                                 f"'<block>.{kind}', but they have different shapes "
                                 f"{sorted(shapes)}; target module types whose layers all have "
                                 "one shape.")
            (in_f, out_f), = shapes
            k_a, k_b = rngs.params(), rngs.params()
            A = _uniform(k_a, (config.r, in_f), 1.0 / math.sqrt(in_f))
            random_b = "v" in train or not config.init_weights
            B = (_uniform(k_b, (out_f, config.r), 1.0 / math.sqrt(config.r)) if random_b
                 else jnp.zeros((out_f, config.r)))
            shared[kind] = SharedFactors(A, B, layers[0].weight_axes)
            for part, var in (("A", shared[kind].lora_A), ("B", shared[kind].lora_B)):
                if part not in train:
                    var.set_metadata("frozen", True)
        for name in names:
            layer = wrap(model, name, get_submodule(model, name), TiedLoraMixin)
            out_f = layer.out_features
            if not config.init_weights:
                v = jax.random.normal(rngs.params(), (out_f,))
            else:
                v = jnp.zeros((out_f,)) if "v" in train else jnp.ones((out_f,))
            vectors = TiedVectors(shared[module_type(name)], jnp.ones((config.r,)), v,
                                  scaling=config.scaling, dropout=config.lora_dropout,
                                  site=site_of(name, adapter_name),
                                  out_axis=layer.weight_axes[1],
                                  factors_train=bool(train & {"A", "B"}))
            for part, var in (("u", vectors.tied_lora_u), ("v", vectors.tied_lora_v)):
                if part not in train:
                    var.set_metadata("frozen", True)
            layer.tied_lora[adapter_name] = vectors
        return {"tied_lora_factors": nnx.Dict({_slot(k): f for k, f in shared.items()})}

    def peft_entries(self, peft_model) -> dict:
        """``base_model.tied_lora.<type>.lora_A`` / ``.lora_B`` (shared), per adapted layer
        ``<module>.tied_lora_u`` / ``.tied_lora_v``, and trained base weights."""
        adapter = peft_model.active_adapter
        out = {}
        for slot, f in peft_model.added["tied_lora_factors"].items():
            kind = slot.replace("__", ".")
            out[f"base_model.tied_lora.{kind}.lora_A"] = (f.lora_A, False)
            out[f"base_model.tied_lora.{kind}.lora_B"] = (f.lora_B, False)
        for name, layer in adapted_layers(peft_model.base_model, TiedLoraMixin):
            if adapter in layer.tied_lora:
                v = layer.tied_lora[adapter]
                out[f"{PREFIX}{name}.tied_lora_u"] = (v.tied_lora_u, False)
                out[f"{PREFIX}{name}.tied_lora_v"] = (v.tied_lora_v, False)
        out.update(self.base_entries(peft_model))
        return out


def save_as_lora(peft_model, directory: str) -> None:
    """Writes the active Tied-LoRA adapter as a plain PEFT LoRA adapter (``adapter_config.json``
    with ``peft_type`` LORA + ``adapter_model.safetensors``): per layer ``lora_A = u * A`` and
    ``lora_B = v * B`` with the same r and alpha, so PyTorch PEFT, vLLM and peftjax's
    ``LoraConfig`` reproduce the adapter's outputs. Trained base weights (heads, biases) are
    written as they are."""
    from peftjax.models._safetensors import save_file
    from peftjax._files import write_json
    from peftjax.tuners._io import CONFIG_FILE, WEIGHTS_FILE
    from peftjax.tuners._lora import LoraConfig
    config = peft_model.peft_config
    if not isinstance(config, TiedLoraConfig):
        raise TypeError(f"save_as_lora needs a Tied-LoRA adapter, not {type(config).__name__}")
    adapter = peft_model.active_adapter
    tensors = {}
    for name, layer in adapted_layers(peft_model.base_model, TiedLoraMixin):
        if adapter in layer.tied_lora:
            t = layer.tied_lora[adapter]
            A, B = t.factors(layer.in_features, layer.out_features)
            u, v = t.scales()
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.asarray(u[:, None] * A, np.float32)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.asarray(v[:, None] * B, np.float32)
    for key, (var, transposed) in config.base_entries(peft_model).items():
        a = np.asarray(var[...])
        tensors[key] = np.ascontiguousarray(a.T if transposed else a)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules, exclude_modules=config.exclude_modules,
                      layers_to_transform=config.layers_to_transform,
                      layers_pattern=config.layers_pattern, modules_to_save=config.modules_to_save,
                      fan_in_fan_out=config.fan_in_fan_out,
                      bias={"tied_lora_only": "lora_only"}.get(config.bias, config.bias),
                      task_type=config.task_type,
                      base_model_name_or_path=config.base_model_name_or_path)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
    write_json(os.path.join(directory, CONFIG_FILE), lora.to_peft_dict())
