"""VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation") with PEFT's semantics and
files (``VERA``).

One pair of frozen random matrices is shared by every adapted layer: ``vera_A`` [r, max_in] and
``vera_B`` [max_out, r] (kaiming-uniform from ``projection_prng_key``, sized for the largest
adapted layer; a layer uses the top-left slice its shape needs). Each layer trains two vectors,
``lambda_d`` [r] (starts at ``d_initial``) and ``lambda_b`` [out] (starts at zero, so the model
starts as the base model):

    y = x W + b + lambda_b * ((lambda_d * (dropout(x) A^T)) B^T)

PEFT's file holds the vectors per layer (``<module>.vera_lambda_b`` / ``.vera_lambda_d``) and,
with ``save_projection=True`` (the default), the shared matrices (``base_model.vera_A`` /
``base_model.vera_B``). The matrices here come from JAX's generator, not torch's: the same
distribution, other numbers, so a file is only complete with its matrices; a PEFT file written
with ``save_projection=False`` is refused by name (PEFT regenerates them with torch's generator).
Merging adds ``(lambda_b B)(lambda_d A)`` to the weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._layers import dropout, param_value
from peftjax.tuners._base import PREFIX, AdapterParam, TunerConfig, register
from peftjax.tuners._layer import (AdaptedLayer, LayerMethod, adapted_layers, site_key,
                                   site_of, wrap)
from peftjax.tuners._lora import _lora_delta
from peftjax.tuners._targets import find_targets, get_submodule

# PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING
DEFAULT_VERA_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value"),
    "roberta": ("query", "value"),
}
BIAS_MODES = ("none", "all", "vera_only")


class VeraParam(AdapterParam):
    """VeRA's trained vectors ``lambda_b`` and ``lambda_d``."""


class Projection(nnx.Variable):
    """A frozen random projection shared by the adapted layers: neither a base weight
    (``nnx.Param``) nor trained (``AdapterParam``), and not counted as a parameter (PEFT keeps
    them as buffers)."""


def _kaiming_uniform(key, shape) -> jax.Array:
    """PEFT's ``_kaiming_init``: U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), fan_in = shape[1]."""
    bound = math.sqrt(6.0 / shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class SharedProjections(nnx.Module):
    """``vera_A`` [r, max_in] and ``vera_B`` [max_out, r], one pair per adapter."""

    def __init__(self, A_RxI: jax.Array, B_OxR: jax.Array):
        self.vera_A = Projection(A_RxI)
        self.vera_B = Projection(B_OxR)


class ScaledSharedFactors(nnx.Module):
    """One adapter's per-layer part of a method built on factors shared between layers (VeRA,
    Tied-LoRA): ``delta W = scaling * (b * B) (d * A)`` with the shared ``A`` [r, in] and ``B``
    [out, r] and this layer's vectors ``d`` [r] and ``b`` [out]. Subclasses name the vectors
    (``scales``) and say how the layer's factors come out of the shared ones (``factors``)."""

    scaling: float = 1.0
    factors_train: bool = False  # whether the shared A or B train (static)

    def factors(self, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def scales(self) -> tuple[jax.Array, jax.Array]:
        """``(d [r], b [out])``."""
        raise NotImplementedError

    def delta_IxO(self, in_features: int, out_features: int) -> jax.Array:
        A, B = self.factors(in_features, out_features)
        d, b = self.scales()
        return ((b[:, None] * B) @ (d[:, None] * A)).T * self.scaling


class VeraVectors(ScaledSharedFactors):
    """One adapter's vectors in one layer, and a reference to its shared projections."""

    def __init__(self, layer, shared: SharedProjections, *, r: int, dropout: float,
                 init_weights: bool, d_initial: float, site: int, rngs: nnx.Rngs):
        self.shared = shared
        self.dropout_rate, self.site = float(dropout), site
        if init_weights:
            b, d = jnp.zeros((layer.out_features,)), jnp.full((r,), d_initial)
        else:  # PEFT's values before its reset: ones and N(0, 1)
            b, d = jnp.ones((layer.out_features,)), jax.random.normal(rngs.params(), (r,))
        _, out_axis = layer.weight_axes
        self.vera_lambda_b = VeraParam(b.astype(jnp.float32), axes=(out_axis,))
        self.vera_lambda_d = VeraParam(d.astype(jnp.float32), axes=(None,))

    def factors(self, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
        """The layer's slices of the shared matrices: ``A`` [r, in], ``B`` [out, r]."""
        return (param_value(self.shared.vera_A)[:, :in_features],
                param_value(self.shared.vera_B)[:out_features, :])

    def scales(self) -> tuple[jax.Array, jax.Array]:
        return param_value(self.vera_lambda_d), param_value(self.vera_lambda_b)


class ScaledSharedMixin(AdaptedLayer):
    """An adapted linear layer applying :class:`ScaledSharedFactors` adapters, with dropout
    on the input as LoRA: ``y = x W + b + s * b_vec * ((d_vec * (dropout(x) A^T)) B^T)``."""

    def _delta(self, names):
        out = jnp.zeros((self.in_features, self.out_features), jnp.float32)
        for n in names:
            out = out + self.adapters[n].delta_IxO(self.in_features, self.out_features)
        return out

    def fold(self, kernel_IxO, bias_O, names):
        return kernel_IxO + self._delta(names), bias_O

    def unfold(self, kernel_IxO, bias_O, names):
        return kernel_IxO - self._delta(names), bias_O

    def __call__(self, x):
        """When the shared factors train (Tied-LoRA's default), through LoRA's product with its
        hand-written backward pass on this layer's scaled factors ``A^T d`` [in, r] and
        ``B^T b`` [r, out]: autodiff lays the rank-r products out transposed over the tokens,
        and a Tied-LoRA step on the quickstart shapes took 4.35 s there against 1.78 s here
        (LoRA: 1.82 s). When only the vectors train (VeRA), autodiff needs no [in, r] product
        for them and is the faster one (VeRA r=256: 1.04 s against 1.17 s)."""
        y = super().__call__(x)
        dt = jnp.dtype(self.dtype)
        for v in self.applied():
            A, B = v.factors(self.in_features, self.out_features)
            d, b = v.scales()
            if v.factors_train:
                h = dropout(x, v.dropout_rate, site_key(v.site))
                y = y + _lora_delta(v.scaling, dt)(h, A.T * d[None, :], B.T * b[None, :])
                continue
            h = dropout(x, v.dropout_rate, site_key(v.site)).astype(dt)
            t = jnp.dot(h, A.T.astype(dt)) * d.astype(dt)
            y = y + jnp.dot(t, B.T.astype(dt)) * (b * v.scaling).astype(dt)
        return y


class VeraMixin(ScaledSharedMixin):
    """Named VeRA adapters on a linear layer: ``vera[name]``."""

    store = "vera"


@register
@dataclasses.dataclass(frozen=True)
class VeraConfig(LayerMethod, TunerConfig):
    """VeRA, with the names, defaults and meaning of PEFT's ``VeraConfig``.

    ``r``: rank of the shared projections (PEFT's default 256: VeRA's vectors are cheap, so
    ranks are high). ``target_modules`` as LoRA's (None: PEFT's default for the family).
    ``projection_prng_key`` seeds the shared matrices; ``save_projection`` stores them in the
    file (needed to load it anywhere). ``d_initial``: start value of ``lambda_d``.
    ``bias``: ``"none"``, ``"all"`` or ``"vera_only"``.
    """

    r: int = 256
    target_modules: Any = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Any = None
    init_weights: bool = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    exclude_modules: Any = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    method = "vera"
    peft_type = "VERA"
    layer_mixin = VeraMixin
    bias_modes = BIAS_MODES

    def __post_init__(self):
        problems = self.shared_problems("vera_dropout")
        if not self.save_projection:
            problems.append("save_projection=False: the shared matrices would have to be "
                            "regenerated from projection_prng_key with torch's generator, which "
                            "peftjax does not reproduce; keep save_projection=True (PEFT's "
                            "default) so the file holds them")
        if problems:
            raise ValueError("invalid VeraConfig: " + "; ".join(problems) + ".")

    def resolved(self, model) -> VeraConfig:
        return self.with_model_defaults(model, target_modules=DEFAULT_VERA_TARGETS)

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        """Draws the shared matrices for the largest targeted layer and gives every targeted
        layer its vectors (the matrices live beside the model, under the adapter's name)."""
        config = self.resolved(model)
        names = find_targets(model, config)
        layers = [get_submodule(model, n) for n in names]
        max_in = max(m.in_features for m in layers)
        max_out = max(m.out_features for m in layers)
        k_a, k_b = jax.random.split(jax.random.key(self.projection_prng_key))
        shared = SharedProjections(_kaiming_uniform(k_a, (self.r, max_in)),
                                   _kaiming_uniform(k_b, (max_out, self.r)))
        for name, layer in zip(names, layers):
            layer = wrap(model, name, layer, VeraMixin)
            layer.vera[adapter_name] = VeraVectors(
                layer, shared, r=self.r, dropout=self.vera_dropout,
                init_weights=self.init_weights, d_initial=self.d_initial,
                site=site_of(name, adapter_name), rngs=rngs)
        return {"vera_projections": shared}

    def peft_entries(self, peft_model) -> dict:
        """``<module>.vera_lambda_b`` / ``.vera_lambda_d`` per adapted layer, the shared
        ``base_model.vera_A`` / ``base_model.vera_B``, and trained base weights."""
        adapter = peft_model.active_adapter
        out = {}
        for name, layer in adapted_layers(peft_model.base_model, VeraMixin):
            if adapter in layer.vera:
                v = layer.vera[adapter]
                out[f"{PREFIX}{name}.vera_lambda_b"] = (v.vera_lambda_b, False)
                out[f"{PREFIX}{name}.vera_lambda_d"] = (v.vera_lambda_d, False)
        shared = peft_model.added["vera_projections"]
        out["base_model.vera_A"] = (shared.vera_A, False)
        out["base_model.vera_B"] = (shared.vera_B, False)
        out.update(self.base_entries(peft_model))
        return out
