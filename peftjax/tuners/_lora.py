"""LoRA (Hu et al. 2021) with Hugging Face PEFT's semantics.

A targeted linear layer ``y = x W + b`` becomes ``y = x W + b + s * dropout(x) A B`` with
``A`` [in, r] and ``B`` [r, out] (PEFT stores ``lora_A.weight`` [r, in] and ``lora_B.weight``
[out, r]; export transposes), ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``A``
kaiming-uniform and ``B`` zero by default, so the model is unchanged right after injection.
Dropout follows the models' rule: it is active only while a dropout key is given (calling the
:class:`PeftModel` with ``dropout_rng=``), and each LoRA layer folds its own site into that key.
The LoRA layer subclasses the layer it adapts and keeps its ``kernel``/``bias`` where they
were, so base checkpoints load into an adapted model unchanged.

DoRA (Liu et al. 2024, ``use_dora=True``) as PEFT computes it: a magnitude vector ``m`` [out]
(PEFT's ``lora_magnitude_vector``) starts at the column norms of ``W + s A B`` and the layer
gives ``(m / n) * (x W + s dropout(x) A B) + b`` with ``n`` the column norms of ``W + s A B``
treated as a constant in the backward pass (the paper's section 4.3); with dropout active the
base term uses the dropped input too, as in PEFT. Merging folds ``m / n`` into the weight, so a
DoRA adapter can be served as plain weights; over a 4-bit base the norms use the dequantized
weight.

QA-LoRA (Xu et al. 2023, ``use_qalora=True``, PEFT's names): the adapter sees the layer input
average-pooled over groups of ``qalora_group_size`` features and multiplied by the number of
groups (PEFT's scaling), so ``A`` has in/group rows and the change ``s A B`` is the same for every
input of a group. Over an INT4 base (:class:`peftjax.quant.Int4Linear`) whose quantization
groups lie inside those groups, merging moves the base's zero points and keeps the weight in
INT4 with nothing lost (PEFT cannot merge QA-LoRA); over any other base it merges like LoRA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._layers import Linear, dropout, param_value
from peftjax.tuners._base import PREFIX, AdapterParam, ServingTerms, TunerConfig, register
from peftjax.tuners._layer import (AdaptedLayer, HostValues, LayerMethod, adapted_layers,
                                   site_key, site_of, wrap)
from peftjax.tuners._targets import find_targets, get_submodule, pattern_key

BIAS_MODES = ("none", "all", "lora_only")
# PEFT's defaults when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_LORA_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value"),
    "roberta": ("query", "value"),
}
# PEFT fields that change the adapter's math: loading must refuse values other than these.
_MUST_BE = {"lora_bias": (False, None), "layer_replication": (None,),
            "target_parameters": (None, []), "trainable_token_indices": (None,),
            "alora_invocation_tokens": (None,),
            "use_bdlora": (None, False), "megatron_config": (None,)}

INITS = (True, False, "gaussian", "loftq")


class LoraParam(AdapterParam):
    """A LoRA factor."""


@functools.cache
def _lora_delta(scaling: float, dtype) -> Any:
    """``delta(h, a, b) = ((h @ a) @ b) * scaling`` with a hand-written backward pass; ``h``
    [..., in] is the layer input after LoRA dropout, matmuls run in ``dtype`` and ``a``, ``b``
    keep their storage dtype (float32). The base layer's own ``__call__`` computes ``x W + b``.

    Autodiff of the same expression lets XLA lay out the rank-r products transposed over the
    tokens, which costs large copies on CPU (a LoRA train step 1.3x slower, measured by
    benchmarks/train_step.py). Here each gradient is one product with the token axis contracted
    in place: ``g = dy B^T s``, ``dh = g A^T``, ``dA = (g^T h)^T``, ``dB = (h A)^T dy s``;
    only the gradients of inputs being differentiated are computed, and dA/dB accumulate in
    float32.
    """
    f32 = jnp.float32

    def value(h, a, b):
        xa = jnp.dot(h.astype(dtype), a.astype(dtype))
        return jnp.dot(xa, b.astype(dtype)) * jnp.asarray(scaling, dtype), xa

    @jax.custom_vjp
    def delta(h, a, b):
        return value(h, a, b)[0]

    def fwd(h, a, b):
        y, xa = value(h.value, a.value, b.value)
        # the layer input is kept only for dA: with A frozen (LoRA-FA) the residual is x A
        # [N, r], not x [N, in] (an empty array stands in, carrying the dtype)
        kept = h.value if a.perturbed else jnp.zeros((0,), h.value.dtype)
        return y, (kept, a.value, b.value, xa, (h.perturbed, a.perturbed, b.perturbed))

    def bwd(res, dy):
        h, a, b, xa, (ph, pa, pb) = res
        if isinstance(dy, jax.custom_derivatives.SymbolicZero):
            return None, None, None
        dy_NO = dy.astype(dtype).reshape(-1, dy.shape[-1])
        g_NR = jnp.dot(dy_NO, b.astype(dtype).T) * jnp.asarray(scaling, dtype)
        dh = da = db = None  # None: a zero cotangent (that input is not differentiated)
        if ph:
            dh = jnp.dot(g_NR, a.astype(dtype).T).reshape(dy.shape[:-1] + a.shape[:1])
            dh = dh.astype(h.dtype)
        if pa:
            da = jnp.einsum("nr,ni->ri", g_NR, h.reshape(-1, h.shape[-1]).astype(dtype),
                            preferred_element_type=f32).T.astype(a.dtype)
        if pb:
            db = (jnp.einsum("nr,no->ro", xa.reshape(-1, xa.shape[-1]), dy_NO,
                             preferred_element_type=f32) * scaling).astype(b.dtype)
        return dh, da, db

    delta.defvjp(fwd, bwd, symbolic_zeros=True)
    return delta


def initial_factors(k_a, k_b, in_f: int, out_f: int, r: int, init) -> tuple:
    """PEFT's initial ``(A [in, r], B [r, out])`` (float32) for ``init_lora_weights``: True
    (A kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r), B zero) or False (both
    kaiming-uniform)."""
    bound_a = 1.0 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)), as torch/PEFT
    if init == "gaussian":
        a_IxR = jax.random.normal(k_a, (in_f, r)) / r
    else:
        a_IxR = jax.random.uniform(k_a, (in_f, r), minval=-bound_a, maxval=bound_a)
    if init is False:
        bound_b = 1.0 / math.sqrt(r)
        b_RxO = jax.random.uniform(k_b, (r, out_f), minval=-bound_b, maxval=bound_b)
    else:
        b_RxO = jnp.zeros((r, out_f))
    return a_IxR, b_RxO


class LoraFactors(nnx.Module):
    """One named adapter's factors in one layer: ``lora_A`` [in, r], ``lora_B`` [r, out]."""

    def __init__(self, base: Linear, *, r: int, scaling: float, dropout: float, init,
                 site: int, rngs: nnx.Rngs, dora: bool = False, factors=None,
                 pool: int | None = None):
        """``factors=(A [in, r], B [r, out])``: start values computed elsewhere (LoftQ);
        ``pool``: QA-LoRA's group size (A then has in/pool rows)."""
        self.r, self.scaling, self.dora = r, float(scaling), dora
        self.dropout_rate, self.site, self.pool = float(dropout), site, pool
        in_f, out_f = base.in_features, base.out_features
        if pool:
            in_f //= pool
        pdt = base.weight_dtype
        pdt = jnp.float32 if jnp.issubdtype(pdt, jnp.floating) and jnp.finfo(pdt).bits < 32 else pdt
        self.init = init
        a_IxR, b_RxO = initial_factors(rngs.params(), rngs.params(), in_f, out_f, r, init)
        if factors is not None:
            a_IxR, b_RxO = factors
        in_axis, out_axis = base.weight_axes
        # adapters train in float32 even over bf16 base weights (mixed precision)
        self.lora_A = LoraParam(a_IxR.astype(pdt), axes=(in_axis, "lora_rank"))
        self.lora_B = LoraParam(b_RxO.astype(pdt), axes=("lora_rank", out_axis))
        if dora:  # DoRA's magnitude: the column norms of the adapted weight at initialisation
            norms = self.norms_O(base.base_kernel_IxO())
            self.lora_magnitude_vector = LoraParam(norms.astype(pdt), axes=(out_axis,))

    def pooled(self, h: jax.Array) -> jax.Array:
        """QA-LoRA's adapter input: ``h`` averaged over each group of ``pool`` features, times
        the number of groups (as PEFT); ``h`` itself for plain LoRA."""
        if not self.pool:
            return h
        n = h.shape[-1] // self.pool
        return h.reshape(*h.shape[:-1], n, self.pool).mean(-1) * n

    def full_A(self) -> jax.Array:
        """``A`` acting on the full input [in, r] (QA-LoRA's pooling folded in)."""
        a = param_value(self.lora_A)
        if not self.pool:
            return a
        return jnp.repeat(a, self.pool, axis=0) * (a.shape[0] / self.pool)

    def delta_IxO(self) -> jax.Array:
        return (self.full_A() @ param_value(self.lora_B)) * self.scaling

    def norms_O(self, kernel_IxO: jax.Array) -> jax.Array:
        """Column norms of ``kernel + s A B`` (float32), a constant for autodiff (DoRA)."""
        w = kernel_IxO.astype(jnp.float32) + self.delta_IxO().astype(jnp.float32)
        return jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))

    def dora_scale(self, kernel_IxO: jax.Array) -> jax.Array:
        """DoRA's ``m / ||W + s A B||`` per output [out] (float32)."""
        return param_value(self.lora_magnitude_vector).astype(jnp.float32) / self.norms_O(
            kernel_IxO)


class LoraMixin(AdaptedLayer):
    """Named LoRA adapters on a linear layer (see the module doc): ``lora[name]`` holds each
    adapter's factors."""

    store = "lora"

    def __init__(self, base: Linear):
        super().__init__(base)
        self._dora_merged = HostValues()  # DoRA factors m / ||W + s A B|| at merge time

    def delta_IxO(self, names=None) -> jax.Array:
        """The summed change ``scaling * A B`` of adapters ``names`` (default: the active ones)."""
        names = self.active if names is None else names
        out = jnp.zeros((self.in_features, self.out_features), jnp.float32)
        for n in names:
            out = out + self.lora[n].delta_IxO().astype(jnp.float32)
        return out

    def fold(self, kernel_IxO, bias_O, names):
        for n in names:
            f = self.lora[n]
            if f.dora:  # (W + s A B) * m / ||W + s A B||; the factor is kept for unfold
                scale = f.dora_scale(kernel_IxO)
                self._dora_merged.factors[n] = scale
                kernel_IxO = (kernel_IxO + f.delta_IxO()) * scale[None, :]
            else:
                kernel_IxO = kernel_IxO + f.delta_IxO().astype(jnp.float32)
        return kernel_IxO, bias_O

    def unfold(self, kernel_IxO, bias_O, names):
        for n in names:  # in reverse order of folding
            f = self.lora[n]
            if f.dora:
                kernel_IxO = kernel_IxO / self._dora_merged.factors.pop(n)[None, :]
            kernel_IxO = kernel_IxO - f.delta_IxO().astype(jnp.float32)
        return kernel_IxO, bias_O

    def restart(self, key: jax.Array) -> None:
        """ReLoRA's restart: folds the active adapters into the frozen weight and starts them
        again (A as at initialisation from ``key``, B zero), so the layer's output is unchanged
        while the next adapters learn a new low-rank change. Runs inside jit."""
        names = tuple(n for n in self.active if n not in self.merged)
        if self.quantized or any(self.lora[n].dora or self.lora[n].pool for n in names):
            raise TypeError("a ReLoRA restart merges into a float weight with plain LoRA "
                            "(not 4-bit bases, DoRA or QA-LoRA)")
        self._write(self.fold, names)
        for i, n in enumerate(names):
            f = self.lora[n]
            a, b = param_value(f.lora_A), param_value(f.lora_B)
            k_a, k_b = jax.random.split(jax.random.fold_in(key, i))
            new_a, new_b = initial_factors(k_a, k_b, a.shape[0], b.shape[1], f.r,
                                           True if f.init == "loftq" else f.init)
            f.lora_A[...] = new_a.astype(a.dtype)
            f.lora_B[...] = new_b.astype(b.dtype)

    def folds_into_quantized(self, names) -> bool:
        """QA-LoRA adapters over an INT4 base whose quantization groups lie inside the
        adapters' pooling groups fold into the zero points (exactly)."""
        # an INT4 layer (peftjax.quant.Int4Linear; quant sits above tuners, so no import here)
        if getattr(self, "quant_type", None) != "int4" or not self.contiguous_groups():
            return False
        return all(self.lora[n].pool and not self.lora[n].dora
                   and self.lora[n].pool % self.group_size == 0 for n in names)

    def fold_quantized(self, names, sign: float) -> None:
        # the change is constant within each quantization group: one row per group
        self.shift_zeros(self.delta_IxO(names)[::self.group_size], sign)

    def __call__(self, x):
        y = super().__call__(x)
        dt = jnp.dtype(self.dtype)
        for f in self.applied():
            h = dropout(x, f.dropout_rate, site_key(f.site))
            d = _lora_delta(f.scaling, dt)(f.pooled(h), param_value(f.lora_A),
                                           param_value(f.lora_B))
            if not f.dora:
                y = y + d
                continue
            kernel = self.base_kernel_IxO()
            scale = f.dora_scale(kernel).astype(dt)
            if h is x:  # no dropout: the base term is what the layer computed, without bias
                base = y if self.bias is None else y - param_value(self.bias).astype(dt)
            else:
                base = jnp.dot(h.astype(dt), kernel.astype(dt))
            y = y + (scale - 1) * base + scale * d
        return y


def is_lora_layer(module) -> bool:
    return isinstance(module, LoraMixin)


def lora_layers(model) -> list:
    """``[(name, layer)]`` of the LoRA layers in ``model``."""
    return adapted_layers(model, LoraMixin)


@register
@dataclasses.dataclass(frozen=True)
class LoraConfig(LayerMethod, TunerConfig):
    """LoRA settings, with the names, defaults and meaning of PEFT's ``LoraConfig``.

    ``target_modules``: list of names (a module matches if its name equals an entry or ends in
    ``"." + entry``), a regex over full names, ``"all-linear"``, or None for the architecture's
    PEFT default. ``rank_pattern`` / ``alpha_pattern`` map a regex on a name suffix to r / alpha.
    ``bias``: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted
    layers train). ``init_lora_weights``: True (A kaiming-uniform, B zero), ``"gaussian"``
    (A ~ N(0, 1/r), B zero) or False (both random: the adapter changes outputs at once).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Any = None
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    modules_to_save: Any = None
    bias: str = "none"
    init_lora_weights: Any = True
    loftq_config: dict = dataclasses.field(default_factory=dict)
    task_type: str | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    use_qalora: bool = False
    qalora_group_size: int = 16
    lora_fa: bool = False  # peftjax's: A stays at its initial values (not in PEFT's file)
    base_model_name_or_path: str | None = None

    method = "lora"
    peft_type = "LORA"
    layer_mixin = LoraMixin
    bias_modes = BIAS_MODES

    @property
    def combinable(self) -> bool:
        """Plain LoRA adapters add up; a DoRA adapter normalises the weight it sees, so its
        result would depend on the order of the active adapters."""
        return not self.use_dora
    harmless_fields = TunerConfig.harmless_fields | {
        "eva_config", "corda_config", "megatron_core",
        "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config",
        "monteclora_config", "velora_config", "runtime_config"}

    def __post_init__(self):
        problems = self.shared_problems("lora_dropout")
        if self.init_lora_weights not in INITS:
            problems.append(f"init_lora_weights={self.init_lora_weights!r} must be True, False, "
                            "'gaussian' or 'loftq' (other PEFT initialisations are not "
                            "implemented)")
        loftq = self.loftq_config or {}
        if not isinstance(loftq, dict) or set(loftq) - {"loftq_bits", "loftq_iter"}:
            problems.append(f"loftq_config={self.loftq_config!r} takes loftq_bits and "
                            "loftq_iter (PEFT's LoftQConfig)")
        elif loftq.get("loftq_bits", 4) != 4:
            problems.append(f"loftq_config loftq_bits={loftq['loftq_bits']!r}: only 4 bits "
                            "(NF4) are implemented")
        elif not (isinstance(loftq.get("loftq_iter", 1), int) and loftq.get("loftq_iter", 1) >= 1):
            problems.append(f"loftq_config loftq_iter={loftq['loftq_iter']!r} must be an "
                            "integer >= 1")
        elif loftq and self.init_lora_weights != "loftq":
            problems.append("loftq_config is set but init_lora_weights is not 'loftq'")
        if self.init_lora_weights == "loftq" and self.use_dora:
            problems.append("init_lora_weights='loftq' with use_dora=True is not implemented")
        for name in ("use_dora", "use_qalora", "lora_fa"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be True or False")
        if not (isinstance(self.qalora_group_size, int) and self.qalora_group_size >= 1):
            problems.append(f"qalora_group_size={self.qalora_group_size!r} must be a positive "
                            "integer")
        if self.use_qalora is True and self.use_dora is True:
            problems.append("use_qalora with use_dora is not implemented (PEFT refuses it too)")
        if self.use_qalora is True and self.init_lora_weights == "loftq":
            problems.append("use_qalora with init_lora_weights='loftq' is not implemented")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                problems.append(f"rank_pattern[{key!r}]={r!r} must be a positive integer")
        for key, a in self.alpha_pattern.items():
            if not a > 0:
                problems.append(f"alpha_pattern[{key!r}]={a!r} must be > 0")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            problems.append("layers_to_transform cannot be combined with a regex target_modules "
                            "(as in PEFT); put the layer indices into the regex")
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems) + ".")

    def rank_alpha(self, name: str) -> tuple[int, float]:
        rk = pattern_key(list(self.rank_pattern), name)
        ak = pattern_key(list(self.alpha_pattern), name)
        return (self.rank_pattern[rk] if rk is not None else self.r,
                self.alpha_pattern[ak] if ak is not None else self.lora_alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        """Gives every targeted linear layer factors named ``adapter_name`` (wrapping it in its
        LoRA class first, in place). ``target_modules`` None means PEFT's per-architecture
        default; no match raises, listing the names."""
        config = self.with_model_defaults(model, target_modules=DEFAULT_LORA_TARGETS)
        for name in find_targets(model, config):
            r, alpha = config.rank_alpha(name)
            factors = None
            if config.init_lora_weights == "loftq":
                factors = self._loftq(model, name, r, config.scaling(r, alpha))
            target = get_submodule(model, name)
            pool = config.qalora_group_size if config.use_qalora else None
            if pool and target.in_features % pool:
                raise ValueError(f"use_qalora: {name} has {target.in_features} input features, "
                                 f"not a multiple of qalora_group_size={pool}; choose a group "
                                 "size that divides every targeted layer's input width")
            layer = wrap(model, name, target, LoraMixin)
            layer.lora[adapter_name] = LoraFactors(
                layer, r=r, scaling=config.scaling(r, alpha), dropout=config.lora_dropout,
                init=config.init_lora_weights, site=site_of(name, adapter_name),
                dora=config.use_dora, rngs=rngs, factors=factors, pool=pool)
            if config.lora_fa:  # LoRA-FA: A frozen at its initialisation, only B trains
                layer.lora[adapter_name].lora_A.set_metadata("frozen", True)
        return {}

    def _loftq(self, model, name: str, r: int, scaling: float) -> tuple:
        """LoftQ for the float layer ``name``: replaces it (in place) by its 4-bit NF4 layer
        and returns the LoRA start ``(A [in, r], B [r, out])`` with ``scaling * A B`` the rank-r
        part (PEFT leaves the scaling out, which is right only for lora_alpha = r)."""
        from peftjax.quant._linear import QuantizedLinear
        from peftjax.quant._loftq import loftq
        from peftjax.tuners._targets import set_submodule
        layer = get_submodule(model, name)
        if getattr(layer, "quantized", False) or isinstance(layer, LoraMixin):
            raise ValueError(f"init_lora_weights='loftq' needs the float weight of {name}, but "
                             "it is already 4-bit or adapted: load the model unquantized; LoftQ "
                             "quantizes the targeted layers itself")
        cfg = {"loftq_iter": 1, **self.loftq_config}  # loftq_bits: 4 (checked)
        packed, state, left, right = loftq(param_value(layer.kernel).T, rank=r,
                                           iters=cfg["loftq_iter"])
        set_submodule(model, name, QuantizedLinear.from_linear(
            layer, quant_type="nf4", blocksize=64, double_quant=False,
            quantized=(packed, state)))
        return right.T / scaling, left.T

    def combine(self, peft_model, adapters: list, weights: list, adapter_name: str, *,
                combination_type: str = "svd", svd_rank: int | None = None,
                svd_clamp: float | None = None, svd_full_matrices: bool = True,
                density: float | None = None, majority_sign_method: str = "total",
                seed: int = 0, dare_mask=None) -> None:
        """PEFT's ``add_weighted_adapter`` for LoRA (see ``PeftModel.add_weighted_adapter``)."""
        from peftjax.tuners import _combine as cb
        cb.check_options(combination_type, density, majority_sign_method)
        configs = [peft_model.peft_configs[a] for a in adapters]
        for a, c in zip(adapters, configs):
            why = ("use_dora" if c.use_dora else "use_qalora" if c.use_qalora else
                   "modules_to_save" if c.modules_to_save else
                   f"bias={c.bias!r}" if c.bias != "none" else None)
            if why:
                raise ValueError(
                    f"add_weighted_adapter: adapter {a!r} has {why}, which a combination of "
                    "LoRA factors cannot carry (PEFT combines only A and B and would give the new "
                    "adapter untrained copies of the rest); combine plain LoRA adapters.")
        if len(adapters) == 1:
            combination_type = "linear"  # as PEFT: one adapter is only re-weighted
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        if combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type.endswith("svd"):
            new_rank = svd_rank or max(ranks)
        elif len(set(ranks)) != 1:
            raise ValueError(f"add_weighted_adapter: combination_type={combination_type!r} needs "
                             f"adapters of one rank, got r={ranks}; use 'cat' or an SVD type "
                             "('svd', 'ties_svd', ...), which take any ranks")
        else:
            new_rank = ranks[0]
        filled = [c.with_model_defaults(peft_model.base_model, target_modules=DEFAULT_LORA_TARGETS)
                  for c in configs]
        kinds = {isinstance(c.target_modules, str) for c in filled}
        if len(kinds) > 1:
            raise ValueError("add_weighted_adapter: the adapters mix a regex target_modules with "
                             "a list of names; combine adapters that name their targets alike")
        if kinds == {True}:
            targets = "|".join(f"({c.target_modules})" for c in filled)
        else:
            targets = tuple(sorted(set().union(*(c.target_modules for c in filled))))
        new = dataclasses.replace(filled[0], r=new_rank, lora_alpha=new_rank,
                                  target_modules=targets, rank_pattern={}, alpha_pattern={},
                                  use_rslora=False, init_lora_weights=True, lora_fa=False,
                                  layers_to_transform=None, layers_pattern=None,
                                  exclude_modules=None, loftq_config={})
        peft_model.add_adapter(adapter_name, new, rngs=nnx.Rngs(0))
        try:
            self._fill_combination(peft_model, adapters, weights, adapter_name, new_rank,
                                   combination_type, svd_clamp, svd_full_matrices, density,
                                   majority_sign_method, dare_mask or cb.default_dare_mask(seed))
        except Exception:
            peft_model.delete_adapter(adapter_name)  # no half-made adapter is left behind
            raise

    @staticmethod
    def _fill_combination(peft_model, adapters, weights, adapter_name, new_rank,
                          combination_type, svd_clamp, svd_full_matrices, density,
                          majority_sign_method, mask_fn) -> None:
        from peftjax.tuners import _combine as cb
        kind = combination_type.removesuffix("_svd")
        for name, layer in lora_layers(peft_model.base_model):
            if adapter_name not in layer.lora:
                continue
            present = [(i, layer.lora[a], w) for i, (a, w) in enumerate(zip(adapters, weights))
                       if a in layer.lora]
            if not present:  # a target of the union no source adapter adapts: no change
                a_new = jnp.zeros((new_rank, layer.in_features))
                b_new = jnp.zeros((layer.out_features, new_rank))
            elif combination_type == "cat":
                a_new = jnp.concatenate([param_value(f.lora_A).T * (w * f.scaling)
                                         for _, f, w in present])
                b_new = jnp.concatenate([param_value(f.lora_B).T for _, f, w in present], axis=1)
                pad = new_rank - a_new.shape[0]
                a_new = jnp.pad(a_new, ((0, pad), (0, 0)))
                b_new = jnp.pad(b_new, ((0, 0), (0, pad)))
            elif combination_type.endswith("svd"):
                deltas = [f.delta_IxO().T for _, f, _ in present]  # [out, in], scaling included
                masks = ([mask_fn(name, "delta", i, d.shape, density)
                          for (i, _, _), d in zip(present, deltas)]
                         if kind.startswith("dare") else None)
                delta = cb.combine_tensors(kind, deltas, [w for _, _, w in present],
                                           density=density, sign_method=majority_sign_method,
                                           masks=masks)
                u, sv, vh = cb.canonical_svd(delta, svd_full_matrices)
                b_new = jnp.asarray(u[:, :new_rank] * sv[None, :new_rank], jnp.float32)
                a_new = jnp.asarray(vh[:new_rank], jnp.float32)
                if svd_clamp is not None:
                    hi = jnp.quantile(jnp.concatenate([b_new.reshape(-1), a_new.reshape(-1)]),
                                      svd_clamp)
                    b_new, a_new = jnp.clip(b_new, -hi, hi), jnp.clip(a_new, -hi, hi)
            else:  # linear, ties, dare_*, magnitude_prune on A and on B separately
                ranks = {f.r for _, f, _ in present}
                if len(ranks) > 1:
                    raise ValueError(f"add_weighted_adapter: {name} has ranks {sorted(ranks)} "
                                     f"in the adapters (rank_pattern); {combination_type!r} "
                                     "needs one rank per layer; use 'cat' or an SVD type")
                w_a, w_b = [], []
                for _, f, w in present:
                    ws = w * f.scaling  # the sign goes to A only
                    w_a.append(math.sqrt(abs(ws)) * (1.0 if ws >= 0 else -1.0))
                    w_b.append(math.sqrt(abs(ws)))
                parts = []
                for part, tensors, ws in (
                        ("lora_A", [param_value(f.lora_A).T for _, f, _ in present], w_a),
                        ("lora_B", [param_value(f.lora_B).T for _, f, _ in present], w_b)):
                    masks = ([mask_fn(name, part, i, t.shape, density)
                              for (i, _, _), t in zip(present, tensors)]
                             if kind.startswith("dare") else None)
                    parts.append(cb.combine_tensors(kind, tensors, ws, density=density,
                                                    sign_method=majority_sign_method,
                                                    masks=masks))
                a_new, b_new = parts
            f = layer.lora[adapter_name]
            f.lora_A[...] = a_new.T.astype(f.lora_A.dtype)
            f.lora_B[...] = b_new.T.astype(f.lora_B.dtype)

    def serving_terms(self, peft_model) -> dict:
        name, out = peft_model.active_adapter, {}
        for path, layer in lora_layers(peft_model.base_model):
            if name not in layer.lora:
                continue
            f = layer.lora[name]
            mag = f.dora_scale(layer.base_kernel_IxO()) if f.dora else None
            out[path] = ServingTerms(a_IxR=f.full_A().astype(jnp.float32),
                                     b_RxO=param_value(f.lora_B).astype(jnp.float32),
                                     scale=f.scaling, magnitude_O=mag)
        return out

    def peft_entries(self, peft_model) -> dict:
        """``<module>.lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r] per adapted layer,
        trained biases of adapted layers as ``<module>.base_layer.bias`` (PEFT's wrapper level),
        other trained parameters under their Hugging Face names."""
        adapter = peft_model.active_adapter
        lora = {n: m.lora[adapter] for n, m in lora_layers(peft_model.base_model)
                if adapter in m.lora}
        out = {}
        for name, f in lora.items():
            out[f"{PREFIX}{name}.lora_A.weight"] = (f.lora_A, True)
            out[f"{PREFIX}{name}.lora_B.weight"] = (f.lora_B, True)
            if f.dora:
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = (f.lora_magnitude_vector, False)
        out.update(self.base_entries(peft_model))
        return out

    def to_peft_dict(self) -> dict:
        out = {**super().to_peft_dict(), "lora_bias": False, "layer_replication": None}
        del out["lora_fa"]  # how it was trained; the file is a plain LoRA adapter
        if self.init_lora_weights == "loftq":
            # the file holds the trained factors; "loftq" would make PEFT re-run LoftQ on load
            # (and overwrite the base weights), so it is written as a plain LoRA start
            out.update(init_lora_weights=True, loftq_config={})
        return out

    @classmethod
    def from_peft_dict(cls, data: dict, path: str) -> LoraConfig:
        bad = {k: data[k] for k, ok in _MUST_BE.items() if k in data and data[k] not in ok}
        if bad:
            raise ValueError(f"{path}: uses PEFT features that change the adapter's math and "
                             f"are not implemented here: {bad}.")
        data = {k: v for k, v in data.items() if k not in _MUST_BE}
        data["use_dora"] = bool(data.get("use_dora"))
        if data.get("init_lora_weights") not in (True, False, "gaussian"):
            data["init_lora_weights"] = True  # only initial values differ; weights are loaded
            # (for "loftq" too: loading never re-runs LoftQ)
        data.pop("loftq_config", None)  # LoftQ is a start; loading never re-runs it
        return super().from_peft_dict(data, path)
