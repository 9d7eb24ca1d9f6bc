"""What the methods that adapt linear layers share (LoRA, (IA)³, ...): the adapted layer class
and the tuner hooks that only walk those layers.

An adapted layer subclasses the layer it adapts (``LoraLinear`` is a ``Linear``, ``IA3Conv1D``
a ``Conv1D``) and takes over its attributes, so the base weights stay where they were and base
checkpoints load into an adapted model unchanged. It holds one module per named adapter in a
``nnx.Dict`` (``layer.lora[name]``, ``layer.ia3[name]``), the names the forward pass applies
(``active``, static: changing it recompiles) and those folded into the weights (``merged``).
A method supplies its per-adapter module, its ``__call__`` and how adapters fold into the
weights (``fold`` / ``unfold``); merging, unmerging, dequantize-and-merge for 4-bit bases and
unloading are here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import functools
import re
import zlib
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._layers import Linear, param_value
from peftjax.models._layers import current_block, traced_context
from peftjax.models._layers import fold as fold_key
from peftjax.tuners._base import in_modules
from peftjax.tuners._targets import get_submodule, named_modules, set_submodule


# The dropout key of the forward pass being traced: set by the method's ``call`` around the
# model call (trace-time Python state, so it works under jit, grad and remat alike).
_DROPOUT_RNG: contextvars.ContextVar = traced_context(
    contextvars.ContextVar("adapter_dropout_rng", default=None))


@contextlib.contextmanager
def dropout_rng(rng: jax.Array | None):
    """Adapted layers called inside this block apply their dropout with keys folded from
    ``rng`` (None: no dropout)."""
    token = _DROPOUT_RNG.set(rng)
    try:
        yield
    finally:
        _DROPOUT_RNG.reset(token)


def site_of(module_path: str, adapter_name: str) -> int:
    """An adapted module's dropout site: a digest of its path without the block index and of
    the adapter's name, so the same module in every block has the same site (identical blocks
    stay identical graphs, which ``train.scan_layers`` needs) and the block's index is folded
    in when the block runs (:func:`site_key`)."""
    relative = re.sub(r"\.\d+(?=\.|$)", "", module_path)
    return zlib.crc32(f"{relative}/{adapter_name}".encode()) & 0x7FFFFFFF


def site_key(site: int) -> jax.Array | None:
    """The dropout key of one adapted module (None when dropout is off): the forward pass's
    key folded with the running block's index (a traced loop counter in a scanned stack) and
    the module's site."""
    rng = _DROPOUT_RNG.get()
    if rng is None:
        return None
    block = current_block()
    return fold_key(rng if block is None else jax.random.fold_in(rng, block), site)


class AdaptedLayer:
    """Mixin in front of a linear layer class (see the module doc)."""

    base_cls: type      # the adapted layer class, set by adapted_class
    store: ClassVar[str]  # attribute holding the per-adapter modules

    def __init__(self, base: Linear):
        take_over(self, base)
        setattr(self, self.store, nnx.Dict())
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()

    @property
    def adapters(self) -> nnx.Dict:
        return getattr(self, self.store)

    def base_kernel_IxO(self) -> jax.Array:
        """The base weight [in, out] in float32 (dequantized for a 4-bit layer)."""
        if self.quantized:
            return self.weight_OxI(jnp.float32).T
        return param_value(self.kernel).astype(jnp.float32)

    def applied(self) -> list:
        """The per-adapter modules the forward pass applies (active, not merged)."""
        return [self.adapters[n] for n in self.active if n not in self.merged]

    def set_active(self, names) -> None:
        self.active = tuple(n for n in names if n in self.adapters)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it first")
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)

    # --------------------------------------------------------- folding into the weights
    def fold(self, kernel_IxO: jax.Array, bias_O, names) -> tuple:
        """``(kernel, bias)`` (float32) with adapters ``names`` folded in."""
        raise NotImplementedError

    def unfold(self, kernel_IxO: jax.Array, bias_O, names) -> tuple:
        """The inverse of :meth:`fold`."""
        raise NotImplementedError

    def _write(self, fn, names) -> None:
        k = param_value(self.kernel)
        b = None if self.bias is None else param_value(self.bias)
        new_k, new_b = fn(k.astype(jnp.float32), None if b is None else b.astype(jnp.float32),
                          names)
        self.kernel[...] = new_k.astype(k.dtype)
        if b is not None:
            self.bias[...] = new_b.astype(b.dtype)

    def folds_into_quantized(self, names) -> bool:
        """Whether adapters ``names`` fold into this 4-bit layer's storage exactly (QA-LoRA
        over INT4); otherwise merging a 4-bit layer dequantizes it."""
        return False

    def fold_quantized(self, names, sign: float) -> None:
        """Folds (sign 1) or unfolds (-1) adapters ``names`` into the 4-bit storage."""
        raise NotImplementedError

    def merge(self, names=None) -> None:
        """Folds adapters ``names`` (default: the active ones) into the weights."""
        todo = tuple(n for n in (self.active if names is None else names) if n not in self.merged)
        if self.quantized and todo and not self.folds_into_quantized(todo):
            raise TypeError(
                "cannot merge an adapter into a 4-bit weight in place: merging needs the float "
                "weight (only QA-LoRA over INT4 folds into the zero points). Use "
                "PeftModel.merge_and_unload() (it dequantizes the adapted layers) and, to store "
                "4 bits again, peftjax.quant.quantize_model (it reports the error).")
        if todo:
            if self.quantized:
                self.fold_quantized(todo, 1.0)
            else:
                self._write(self.fold, todo)
            self.merged = self.merged + todo

    def unmerge(self) -> None:
        if self.merged:
            if self.quantized:
                self.fold_quantized(self.merged[::-1], -1.0)
            else:
                self._write(self.unfold, self.merged[::-1])
            self.merged = ()

    def unloaded(self) -> Linear:
        """The plain base-class layer holding this layer's (possibly merged) weights."""
        plain = nnx.eval_shape(lambda: self.base_cls(**self.rebuild_kwargs(), rngs=nnx.Rngs(0)))
        for k in self._base_attrs:
            setattr(plain, k, getattr(self, k))
        return plain

    def merged_float(self, dtype=None) -> Linear:
        """For a 4-bit base: a float ``Linear`` holding the dequantized base with the active
        adapters folded in (float32, rounded once to ``dtype``, default the weight's original
        dtype)."""
        if not self.quantized:
            raise TypeError("merged_float is for 4-bit layers; merge() a float layer in place")
        plain = self.unloaded().dequantized(jnp.float32)
        bias = None if plain.bias is None else param_value(plain.bias)
        kernel, bias = self.fold(param_value(plain.kernel), bias, self.active)
        dtype = dtype or self.weight_dtype
        plain.kernel = nnx.Param(kernel.astype(dtype), **plain.kernel.get_metadata())
        if bias is not None:
            plain.bias = nnx.Param(bias.astype(dtype), **plain.bias.get_metadata())
        return plain


class HostValues:
    """Values a layer keeps beside its state (e.g. what unmerging needs): a static attribute
    equal to every other, so keeping values here never changes a compiled function's key and
    the same layer in every block has the same graph."""

    def __init__(self):
        self.factors: dict = {}

    def __eq__(self, other) -> bool:
        return isinstance(other, HostValues)

    def __hash__(self) -> int:
        return hash(HostValues)


def take_over(layer, base: Linear) -> None:
    """Gives ``layer`` (a wrapper class in front of ``base``'s) ``base``'s attributes, so its
    weights stay where they were."""
    layer._base_attrs = tuple(k for k in vars(base) if not k.startswith("_"))
    for k in layer._base_attrs:
        setattr(layer, k, getattr(base, k))


@functools.cache
def adapted_class(mixin: type, base_cls: type) -> type:
    """``LoraLinear`` for (LoraMixin, Linear), ``IA3Conv1D`` for (IA3Mixin, Conv1D), ...: the
    same Hugging Face names as the base class."""
    prefix = mixin.__name__.removesuffix("Mixin")
    return type(f"{prefix}{base_cls.__name__}", (mixin, base_cls), {"base_cls": base_cls})


def adapted_layers(model, mixin: type = AdaptedLayer) -> list:
    """``[(name, layer)]`` of the layers in ``model`` adapted by ``mixin`` (default: any)."""
    return [(n, m) for n, m in named_modules(model) if isinstance(m, mixin)]


def wrap(model, name: str, layer, mixin: type):
    """The layer ``name`` adapted by ``mixin`` (wrapping it in place the first time)."""
    if isinstance(layer, mixin):
        return layer
    if isinstance(layer, AdaptedLayer):
        raise ValueError(f"{name} is already adapted by another method "
                         f"({type(layer).__name__}); one method per model")
    new = adapted_class(mixin, type(layer))(layer)
    set_submodule(model, name, new)
    return new


def call_with_adapter_dropout(peft_model, args, kwargs):
    """The model call of methods whose modules sit inside the model (layer methods, bottleneck
    adapters): their dropout keys derive from the call's ``dropout_rng``."""
    with dropout_rng(fold_key(kwargs.get("dropout_rng"), -100)):
        return peft_model.base_model(*args, **kwargs)


class LayerMethod:
    """Tuner hooks for methods whose adapters live in adapted layers (mix into the config
    class before ``TunerConfig``); ``layer_mixin`` is the method's :class:`AdaptedLayer`."""

    layer_mixin: ClassVar[type]
    mergeable: ClassVar[bool] = True
    combinable: ClassVar[bool] = True
    bias_modes: ClassVar[tuple] = ("none", "all")

    def shared_problems(self, dropout_field: str | None = None) -> list[str]:
        """Normalises the module-list fields to tuples and checks the fields layer methods
        share (those the config has): ``r``, ``lora_alpha``, the dropout field, ``bias``,
        ``layers_pattern``, ``task_type``. Returns the problems found."""
        from peftjax.tuners._base import TASK_TYPES, as_tuple
        for name in ("target_modules", "exclude_modules", "feedforward_modules",
                     "layers_to_transform", "layers_pattern", "modules_to_save"):
            if hasattr(self, name):
                object.__setattr__(self, name, as_tuple(getattr(self, name)))
        problems = []
        if hasattr(self, "r") and (not isinstance(self.r, int) or self.r <= 0):
            problems.append(f"r={self.r!r} must be a positive integer")
        if hasattr(self, "lora_alpha") and not self.lora_alpha > 0:
            problems.append(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if dropout_field is not None:
            rate = getattr(self, dropout_field)
            if not 0.0 <= rate < 1.0:
                problems.append(f"{dropout_field}={rate!r} must be in [0, 1)")
        if hasattr(self, "bias") and self.bias not in self.bias_modes:
            problems.append(f"bias={self.bias!r} must be one of {self.bias_modes}")
        if getattr(self, "layers_pattern", None) is not None and self.layers_to_transform is None:
            problems.append("layers_pattern only applies together with layers_to_transform")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r} must be one of {TASK_TYPES}")
        return problems

    def with_model_defaults(self, model, **tables):
        """The config with each field named in ``tables`` (``target_modules=
        {model_type: default}``) filled from its table where it is None, and
        ``fan_in_fan_out`` set for GPT-2's Conv1D layers, as PEFT does."""
        kind = model.config.model_type
        filled = {}
        for field, table in tables.items():
            if getattr(self, field) is None:
                if kind not in table:
                    raise ValueError(f"no default {field} for model_type={kind!r}; pass "
                                     f"{field} explicitly.")
                filled[field] = table[kind]
        if kind == "gpt2" and hasattr(self, "fan_in_fan_out"):
            filled["fan_in_fan_out"] = True
        return dataclasses.replace(self, **filled) if filled else self

    def call(self, peft_model, args, kwargs):
        return call_with_adapter_dropout(peft_model, args, kwargs)

    def base_entries(self, peft_model) -> dict:
        """PEFT key -> (variable, transposed) for the trained base weights: under their Hugging
        Face names, a bias of a layer the active adapter adapts under
        ``<module>.base_layer.bias`` (PEFT's wrapper level)."""
        adapter = peft_model.active_adapter
        own = {n for n, layer in adapted_layers(peft_model.base_model, self.layer_mixin)
               if adapter in layer.adapters}
        return peft_model.trained_base_entries(
            rename=lambda owner, key: f"{owner}.base_layer.bias"
            if owner in own and key.endswith(".bias") else key)

    def trains(self, path, var, peft_model) -> bool:
        """``modules_to_save`` weights, and biases as the config's ``bias`` says (if it has
        one): ``"all"`` every bias, ``"<method>_only"`` (``lora_only``, ``vera_only``) the
        biases of layers the active adapter adapts."""
        if in_modules(path, var, self.modules_to_save):
            return True
        bias = getattr(self, "bias", "none")
        if bias == "none" or not isinstance(var, nnx.Param) or path[0] != "base_model" or \
                path[-1] != "bias":
            return False
        if bias == "all":
            return True
        layer = get_submodule(peft_model.base_model, ".".join(map(str, path[1:-1])))
        return isinstance(layer, self.layer_mixin) and peft_model.active_adapter in layer.adapters

    def activate(self, peft_model, names: tuple) -> None:
        for _, layer in adapted_layers(peft_model.base_model, self.layer_mixin):
            layer.set_active(names)

    def remove(self, peft_model, adapter_name: str) -> None:
        """Deletes the adapter's modules; layers left without adapters become plain again."""
        base = peft_model.base_model
        for name, layer in adapted_layers(base, self.layer_mixin):
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
                if not len(layer.adapters):
                    set_submodule(base, name, layer.unloaded())

    def unload(self, peft_model):
        base = peft_model.base_model
        for name, layer in adapted_layers(base, self.layer_mixin):
            set_submodule(base, name, layer.unloaded())
        return base

    def merge_and_unload(self, peft_model, dtype=None):
        """Merges the active adapters (the others are dropped). A 4-bit layer with an active
        adapter becomes a float ``Linear`` holding the dequantized base with the adapter folded
        in (in ``dtype``, default the weight's original dtype), as PEFT does for bitsandbytes
        layers, unless the adapters fold into its 4-bit storage exactly (QA-LoRA over INT4:
        the layer stays INT4); other 4-bit layers stay 4-bit."""
        base = peft_model.base_model
        for name, layer in adapted_layers(base, self.layer_mixin):
            if layer.quantized and layer.active and not layer.folds_into_quantized(layer.active):
                set_submodule(base, name, layer.merged_float(dtype))
            else:
                layer.merge()
        return self.unload(peft_model)
