"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") with PEFT's semantics (``IA3``).

A targeted linear layer gets a learned vector ``l`` that rescales it: the output
(``y = (x W + b) * l``, ``l`` [out]) for attention projections, the input
(``y = (x * l) W + b``, ``l`` [in]) for the ``feedforward_modules``. ``l`` starts at one, so the
model is unchanged right after injection. PEFT's file holds ``<module>.ia3_l`` shaped
[out, 1] (output scaling) or [1, in] (input scaling); PEFT's per-architecture defaults fill
``target_modules`` and ``feedforward_modules``. A module counts as feed-forward when its name
ends with an entry of ``feedforward_modules`` (or fully matches it, if a regex), exactly PEFT's
rule: on BERT the default ``output.dense`` also makes the attention output projection
(``attention.output.dense``) an input-scaled layer, as in PEFT.

Merging multiplies the vector into the weight (rows for input scaling; columns and the bias
for output scaling). Unmerging divides it out again; PEFT adds 1e-8 to the divisor and warns
that the result can be inaccurate, here a vector with a zero entry refuses to unmerge instead.
Several active adapters multiply their vectors, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.tuners._base import PREFIX, AdapterParam, ServingTerms, TunerConfig, register
from peftjax.tuners._layer import AdaptedLayer, LayerMethod, adapted_layers, wrap
from peftjax.tuners._targets import find_targets, get_submodule

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
DEFAULT_IA3_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"), "qwen3": ("q_proj", "v_proj", "down_proj"),
    "gemma": ("q_proj", "v_proj", "down_proj"), "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "mlp.c_proj"),
    "bert": ("key", "value", "output.dense"), "roberta": ("key", "value", "output.dense"),
}
DEFAULT_IA3_FEEDFORWARD = {
    "llama": ("down_proj",), "mistral": ("down_proj",), "qwen2": ("down_proj",),
    "qwen3": ("down_proj",), "gemma": ("down_proj",), "gemma2": ("down_proj",),
    "gemma3_text": ("down_proj",), "gpt2": ("mlp.c_proj",), "bert": ("output.dense",),
    "roberta": ("output.dense",),
}


class IA3Param(AdapterParam):
    """An (IA)³ scaling vector."""


class IA3Vector(nnx.Module):
    """One adapter's vector in one layer: ``ia3_l`` [1, in] (feed-forward: scales the input) or
    [out, 1] (scales the output), PEFT's shapes."""

    def __init__(self, layer, *, feedforward: bool, init_ones: bool, rngs: nnx.Rngs):
        self.feedforward = feedforward
        shape = (1, layer.in_features) if feedforward else (layer.out_features, 1)
        value = (jnp.ones(shape, jnp.float32) if init_ones else
                 jax.random.normal(rngs.params(), shape, jnp.float32))
        in_axis, out_axis = layer.weight_axes
        axes = (None, in_axis) if feedforward else (out_axis, None)
        self.ia3_l = IA3Param(value, axes=axes)

    def vector(self) -> jax.Array:
        return self.ia3_l[...].reshape(-1)


class IA3Mixin(AdaptedLayer):
    """Named (IA)³ vectors on a linear layer: ``ia3[name]``."""

    store = "ia3"

    def scales(self, names) -> tuple:
        """``(input scale [in] or None, output scale [out] or None)``: the product of the
        vectors of adapters ``names``."""
        s_in = s_out = None
        for n in names:
            v = self.ia3[n]
            if v.feedforward:
                s_in = v.vector() if s_in is None else s_in * v.vector()
            else:
                s_out = v.vector() if s_out is None else s_out * v.vector()
        return s_in, s_out

    def __call__(self, x):
        s_in, s_out = self.scales([n for n in self.active if n not in self.merged])
        if s_in is not None:
            x = (x.astype(jnp.float32) * s_in).astype(x.dtype)
        y = super().__call__(x)
        if s_out is not None:
            y = (y.astype(jnp.float32) * s_out).astype(y.dtype)
        return y

    def fold(self, kernel_IxO, bias_O, names):
        s_in, s_out = self.scales(names)
        if s_in is not None:
            kernel_IxO = kernel_IxO * s_in[:, None]
        if s_out is not None:
            kernel_IxO = kernel_IxO * s_out[None, :]
            bias_O = None if bias_O is None else bias_O * s_out
        return kernel_IxO, bias_O

    def unfold(self, kernel_IxO, bias_O, names):
        s_in, s_out = self.scales(names)
        for s in (s_in, s_out):
            if s is not None and bool(jnp.any(s == 0)):
                raise ValueError("an (IA)³ vector has a zero entry: the merged weight has lost "
                                 "that row/column, so it cannot be unmerged. Reload the base "
                                 "weights instead.")
        if s_in is not None:
            kernel_IxO = kernel_IxO / s_in[:, None]
        if s_out is not None:
            kernel_IxO = kernel_IxO / s_out[None, :]
            bias_O = None if bias_O is None else bias_O / s_out
        return kernel_IxO, bias_O


@register
@dataclasses.dataclass(frozen=True)
class IA3Config(LayerMethod, TunerConfig):
    """(IA)³, with the names, defaults and meaning of PEFT's ``IA3Config``.

    ``target_modules`` / ``feedforward_modules``: lists of names (a module matches if its name
    equals an entry or ends in ``"." + entry``) or a regex over full names; None takes PEFT's
    default for the architecture. ``feedforward_modules`` must be among the targets.
    ``init_ia3_weights``: True starts every vector at one (the model unchanged), False draws
    them N(0, 1). ``modules_to_save``: base modules that train and are saved with the adapter.
    """

    target_modules: Any = None
    exclude_modules: Any = None
    feedforward_modules: Any = None
    fan_in_fan_out: bool = False
    modules_to_save: Any = None
    init_ia3_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    method = "ia3"
    peft_type = "IA3"
    layer_mixin = IA3Mixin

    def __post_init__(self):
        problems = self.shared_problems()
        t, f = self.target_modules, self.feedforward_modules
        if isinstance(t, tuple) and isinstance(f, tuple) and not set(f) <= set(t):
            problems.append(f"feedforward_modules {sorted(set(f) - set(t))} are not in "
                            f"target_modules {list(t)} (they must be a subset, as in PEFT)")
        if not isinstance(self.init_ia3_weights, bool):
            problems.append(f"init_ia3_weights={self.init_ia3_weights!r} must be True or False")
        if problems:
            raise ValueError("invalid IA3Config: " + "; ".join(problems) + ".")

    def resolved(self, model) -> IA3Config:
        """Fills ``target_modules`` / ``feedforward_modules`` with PEFT's defaults for the
        architecture (and ``fan_in_fan_out`` for GPT-2's Conv1D layers, as PEFT sets it)."""
        return self.with_model_defaults(model, target_modules=DEFAULT_IA3_TARGETS,
                                        feedforward_modules=DEFAULT_IA3_FEEDFORWARD)

    def is_feedforward(self, name: str) -> bool:
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, name) is not None
        return any(name.endswith(f) for f in ff or ())

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        """Gives every targeted linear layer a vector named ``adapter_name``."""
        config = self.resolved(model)
        for name in find_targets(model, config):
            layer = wrap(model, name, get_submodule(model, name), IA3Mixin)
            layer.ia3[adapter_name] = IA3Vector(layer, feedforward=config.is_feedforward(name),
                                                init_ones=config.init_ia3_weights, rngs=rngs)
        return {}

    def combine(self, peft_model, adapters: list, weights: list, adapter_name: str,
                **options) -> None:
        """PEFT's IA3 ``add_weighted_adapter``: the new vector is ``sum_i w_i l_i`` per layer,
        over the union of the adapters' targets. Where an adapter does not adapt a layer it
        counts as the identity (ones); PEFT counts it as zero, which with disjoint targets
        zeroes a layer's output."""
        if options:
            raise ValueError(f"add_weighted_adapter: (IA)³ adapters combine as a weighted sum of "
                             f"their vectors; {sorted(options)} apply to LoRA")
        configs = [peft_model.peft_configs[a].resolved(peft_model.base_model) for a in adapters]
        for a, c in zip(adapters, configs):
            if c.modules_to_save:
                raise ValueError(f"add_weighted_adapter: adapter {a!r} has modules_to_save, "
                                 "which a combination of vectors cannot carry; combine adapters "
                                 "without them")
        kinds = {isinstance(c.target_modules, str) for c in configs} | {
            isinstance(c.feedforward_modules, str) for c in configs}
        if len(kinds) > 1:
            raise ValueError("add_weighted_adapter: the adapters mix regex and list "
                             "target_modules / feedforward_modules; combine adapters that name "
                             "their targets alike")
        if kinds == {True}:
            targets = "|".join(f"({c.target_modules})" for c in configs)
            ff = "|".join(f"({c.feedforward_modules})" for c in configs)
        else:
            targets = tuple(sorted(set().union(*(c.target_modules for c in configs))))
            ff = tuple(sorted(set().union(*(c.feedforward_modules for c in configs))))
        new = dataclasses.replace(configs[0], target_modules=targets, feedforward_modules=ff,
                                  init_ia3_weights=True, exclude_modules=None)
        peft_model.add_adapter(adapter_name, new, rngs=nnx.Rngs(0))
        for _, layer in adapted_layers(peft_model.base_model, IA3Mixin):
            if adapter_name not in layer.ia3:
                continue
            total = 0.0
            for a, w in zip(adapters, weights):
                total = total + w * (layer.ia3[a].ia3_l[...] if a in layer.ia3 else 1.0)
            target = layer.ia3[adapter_name].ia3_l
            target[...] = jnp.broadcast_to(jnp.asarray(total, jnp.float32), target.shape)

    def serving_terms(self, peft_model) -> dict:
        name, out = peft_model.active_adapter, {}
        for path, layer in adapted_layers(peft_model.base_model, IA3Mixin):
            if name not in layer.ia3:
                continue
            v = layer.ia3[name]
            out[path] = (ServingTerms(in_scale_I=v.vector()) if v.feedforward else
                         ServingTerms(out_scale_O=v.vector()))
        return out

    def peft_entries(self, peft_model) -> dict:
        """``<module>.ia3_l`` per adapted layer, and ``modules_to_save`` weights under their
        Hugging Face names."""
        adapter = peft_model.active_adapter
        out = {f"{PREFIX}{name}.ia3_l": (layer.ia3[adapter].ia3_l, False)
               for name, layer in adapted_layers(peft_model.base_model, IA3Mixin)
               if adapter in layer.ia3}
        out.update(self.base_entries(peft_model))
        return out
