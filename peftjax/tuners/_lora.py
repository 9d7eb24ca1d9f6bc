"""LoRA (Hu et al. 2021) with Hugging Face PEFT's semantics.

A targeted linear layer ``y = x W + b`` becomes ``y = x W + b + s * dropout(x) A B`` with
``A`` [in, r] and ``B`` [r, out] (PEFT stores ``lora_A.weight`` [r, in] and ``lora_B.weight``
[out, r]; export transposes), ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``A``
kaiming-uniform and ``B`` zero by default, so the model is unchanged right after injection.
Dropout follows the models' rule: it is active only while a dropout key is given (calling the
:class:`PeftModel` with ``dropout_rng=``), and each LoRA layer folds its own site into that key.
The LoRA layer subclasses the layer it adapts and keeps its ``kernel``/``bias`` where they
were, so base checkpoints load into an adapted model unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._layers import Linear, dropout, fold, param_value
from peftjax.tuners._targets import pattern_key

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM",
              "QUESTION_ANS")
BIAS_MODES = ("none", "all", "lora_only")

# The dropout key of the forward pass being traced: set by PeftModel.__call__ around the model
# call (trace-time Python state, so it works under jit, grad and remat alike).
_DROPOUT_RNG: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_rng", default=None)


@contextlib.contextmanager
def lora_dropout_rng(rng: jax.Array | None):
    """LoRA layers called inside this block apply their dropout with keys folded from ``rng``
    (None: no dropout)."""
    token = _DROPOUT_RNG.set(rng)
    try:
        yield
    finally:
        _DROPOUT_RNG.reset(token)


class LoraParam(nnx.Variable):
    """A LoRA factor. Deliberately not an ``nnx.Param``: ``nnx.Param`` means frozen base weight."""


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple, set)) else v


@dataclasses.dataclass(frozen=True)
class LoraConfig:
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
    task_type: str | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    peft_type: str = dataclasses.field(default="LORA", init=False)

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                     "modules_to_save"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        problems = []
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r={self.r!r} must be a positive integer")
        if not self.lora_alpha > 0:
            problems.append(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.bias not in BIAS_MODES:
            problems.append(f"bias={self.bias!r} must be one of {BIAS_MODES}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            problems.append(f"init_lora_weights={self.init_lora_weights!r} must be True, False or "
                            "'gaussian' (other PEFT initialisations are not implemented)")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r} must be one of {TASK_TYPES}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                problems.append(f"rank_pattern[{key!r}]={r!r} must be a positive integer")
        for key, a in self.alpha_pattern.items():
            if not a > 0:
                problems.append(f"alpha_pattern[{key!r}]={a!r} must be > 0")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            problems.append("layers_pattern only applies together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            problems.append("layers_to_transform cannot be combined with a regex target_modules "
                            "(as in PEFT); put the layer indices into the regex")
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems) + ".")

    def __hash__(self):  # the config is static metadata of the model graph, so it must hash
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def rank_alpha(self, name: str) -> tuple[int, float]:
        rk = pattern_key(list(self.rank_pattern), name)
        ak = pattern_key(list(self.alpha_pattern), name)
        return (self.rank_pattern[rk] if rk is not None else self.r,
                self.alpha_pattern[ak] if ak is not None else self.lora_alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _zeros_if_none(value, like):
    return jnp.zeros_like(like) if value is None else value


@functools.cache
def _lora_matmul(scaling: float, dtype) -> Any:
    """``f(x, h, kernel, a, b) = x @ kernel + ((h @ a) @ b) * scaling`` with a hand-written
    backward pass. ``x`` [..., in] feeds the base weight and ``h`` (x after LoRA dropout) the
    adapter; matmuls run in ``dtype`` and ``a``, ``b`` keep their storage dtype (float32).

    Autodiff of the same expression lets XLA lay out the rank-r products transposed over the
    tokens, which costs large copies on CPU (2.7x slower backward on a 1024x512x1408 layer).
    Here each gradient is one product with the token axis contracted in place:
    ``g = dy B^T s``, ``dA = (g^T h)^T``, ``dB = (h A)^T dy s``, ``dx = dy W^T``, ``dh = g A^T``.
    Gradients are computed only for inputs being differentiated (a frozen kernel gets none),
    and dA/dB accumulate in float32.
    """
    f32 = jnp.float32

    def value(x, h, kernel, a, b):
        xa = jnp.dot(h.astype(dtype), a.astype(dtype))
        base = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        return base + jnp.dot(xa, b.astype(dtype)) * jnp.asarray(scaling, dtype), xa

    @jax.custom_vjp
    def op(x, h, kernel, a, b):
        return value(x, h, kernel, a, b)[0]

    def fwd(x, h, kernel, a, b):
        y, xa = value(x.value, h.value, kernel.value, a.value, b.value)
        perturbed = tuple(v.perturbed for v in (x, h, kernel, a, b))
        return y, (x.value, h.value, kernel.value, a.value, b.value, xa, perturbed)

    def bwd(res, dy):
        x, h, kernel, a, b, xa, (px, ph, pk, pa, pb) = res
        if isinstance(dy, jax.custom_derivatives.SymbolicZero):
            return tuple(jnp.zeros_like(v) for v in (x, h, kernel, a, b))
        dy = dy.astype(dtype)
        dy_NO = dy.reshape(-1, dy.shape[-1])
        s = jnp.asarray(scaling, dtype)
        g_NR = jnp.dot(dy_NO, b.astype(dtype).T) * s
        dx = dh = dk = da = db = None
        if px:
            dx = jnp.dot(dy, kernel.astype(dtype).T).astype(x.dtype)
        if ph:
            dh = jnp.dot(g_NR, a.astype(dtype).T).reshape(h.shape).astype(h.dtype)
        if pk:
            dk = jnp.einsum("ni,no->io", x.reshape(-1, x.shape[-1]).astype(dtype), dy_NO,
                            preferred_element_type=f32).astype(kernel.dtype)
        if pa:
            da = jnp.einsum("nr,ni->ri", g_NR, h.reshape(-1, h.shape[-1]).astype(dtype),
                            preferred_element_type=f32).T.astype(a.dtype)
        if pb:
            db = (jnp.einsum("nr,no->ro", xa.reshape(-1, xa.shape[-1]), dy_NO,
                             preferred_element_type=f32) * scaling).astype(b.dtype)
        return tuple(_zeros_if_none(d, v) for d, v in zip((dx, dh, dk, da, db),
                                                           (x, h, kernel, a, b)))

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


class LoraMixin:
    """Adds ``lora_A`` [in, r], ``lora_B`` [r, out] to a linear layer class (see module doc)."""

    base_cls: type  # the adapted layer class, set by lora_class

    def __init__(self, base: Linear, *, r: int, scaling: float, dropout: float, init,
                 site: int, rngs: nnx.Rngs):
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dtype = base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        self.r, self.scaling, self.merged = r, float(scaling), False
        pdt = param_value(base.kernel).dtype
        pdt = jnp.float32 if jnp.issubdtype(pdt, jnp.floating) and jnp.finfo(pdt).bits < 32 else pdt
        k_a, k_b = rngs.params(), rngs.params()
        bound_a = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)), as torch/PEFT
        if init == "gaussian":
            a_IxR = jax.random.normal(k_a, (self.in_features, r)) / r
        else:
            a_IxR = jax.random.uniform(k_a, (self.in_features, r), minval=-bound_a, maxval=bound_a)
        if init is False:
            bound_b = 1.0 / math.sqrt(r)
            b_RxO = jax.random.uniform(k_b, (r, self.out_features), minval=-bound_b, maxval=bound_b)
        else:
            b_RxO = jnp.zeros((r, self.out_features))
        in_axis, out_axis = base.kernel.get_metadata().get("axes", (None, None))
        # adapters train in float32 even over bf16 base weights (mixed precision)
        self.lora_A = LoraParam(a_IxR.astype(pdt), axes=(in_axis, "lora_rank"))
        self.lora_B = LoraParam(b_RxO.astype(pdt), axes=("lora_rank", out_axis))
        self.dropout_rate, self.site = float(dropout), site

    def delta_IxO(self) -> jax.Array:
        return (param_value(self.lora_A) @ param_value(self.lora_B)) * self.scaling

    def __call__(self, x):
        if self.merged:
            return super().__call__(x)
        h = dropout(x, self.dropout_rate, fold(_DROPOUT_RNG.get(), self.site))
        y = _lora_matmul(self.scaling, jnp.dtype(self.dtype))(
            x, h, param_value(self.kernel), param_value(self.lora_A), param_value(self.lora_B))
        if self.bias is not None:
            y = y + param_value(self.bias).astype(self.dtype)
        return y

    def merge(self) -> None:
        if not self.merged:
            k = param_value(self.kernel)
            self.kernel[...] = (k.astype(jnp.float32) + self.delta_IxO()).astype(k.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            k = param_value(self.kernel)
            self.kernel[...] = (k.astype(jnp.float32) - self.delta_IxO()).astype(k.dtype)
            self.merged = False

    def unloaded(self) -> Linear:
        """The plain base-class layer holding this layer's (possibly merged) weights."""
        plain = nnx.eval_shape(lambda: self.base_cls(self.in_features, self.out_features,
                                                use_bias=self.bias is not None,
                                                axes=self.kernel.get_metadata()["axes"],
                                                dtype=self.dtype,
                                                param_dtype=param_value(self.kernel).dtype,
                                                rngs=nnx.Rngs(0)))
        plain.kernel, plain.bias = self.kernel, self.bias
        return plain


@functools.cache
def lora_class(base_cls: type) -> type:
    """``LoraLinear`` for ``Linear``, ``LoraConv1D`` for ``Conv1D``: same HF names as the base."""
    return type(f"Lora{base_cls.__name__}", (LoraMixin, base_cls), {"base_cls": base_cls})


def is_lora_layer(module) -> bool:
    return isinstance(module, LoraMixin)
