"""Group-wise asymmetric INT4, the weight format of GPTQ-style checkpoints, and its layer.

A weight W [out, in] is cut along the input axis into groups of ``group_size`` features. Each
(output row, group) keeps a scale ``s`` and a zero point ``z``; a value is stored as
``q = clamp(round(w / s) + z, 0, 15)`` and read back as ``s * (q - z)``. The grid is GPTQ's
round-to-nearest one: ``[min(w, 0), max(w, 0)]`` over the group spread over 15 steps
(``s = (max - min) / 15``, ``z = round(-min / s)``), with ``s`` rounded to float16 first, as
GPTQ checkpoints store it, so saving and reloading is exact. (GPTQ proper also adjusts the
values with second-order calibration; this module stores its output and quantizes by rounding.)

Zero points are kept as float32. They are integers after quantizing or loading a GPTQ
checkpoint; QA-LoRA's merge (``LoraConfig(use_qalora=True)``) shifts them by real numbers: the
adapter's change is constant within a group, so ``s (q - z) + d = s (q - (z - d / s))`` folds
it into the zero point without touching ``q`` -- the merged INT4 model computes what the
unmerged one did. The GPTQ layout stores integer zero points, so such a model is written in
peftjax's own variant of the layout (float32 ``zeros``); :func:`round_zero_points` turns it into
a standard GPTQ checkpoint and reports what the rounding costs.

GPTQ layout (``checkpoint_format: gptq``, 4 bits, ``sym: false``) for a layer ``X``:
``X.qweight`` int32 [in/8, out] (eight input rows per word, the first in the lowest bits),
``X.qzeros`` int32 [groups, out/8] (eight outputs per word, each stored minus one: the "v1"
convention transformers and GPTQModel read), ``X.scales`` float16 [groups, out], ``X.g_idx``
int32 [in] (the group of every input feature; arbitrary with ``desc_act``), ``X.bias``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._layers import Linear, param_value
from peftjax.quant._formats import INT4_GROUP_SIZES as GROUP_SIZES
from peftjax.quant._linear import QuantizedLinear, QuantWeight, check_divides

MAXQ = 15


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size (blocksize) {group_size!r}: choose one of "
                         f"{GROUP_SIZES} (GPTQ checkpoints mostly use 128, 64 or 32).")


@functools.partial(jax.jit, static_argnames=("group_size",))
def quantize_int4(w_OxI: jax.Array, *, group_size: int):
    """GPTQ's round-to-nearest asymmetric grid per (row, group): ``(q uint8 [out, in] in 0..15,
    scales float16 [out, groups], zeros float32 [out, groups])`` (integer zero points)."""
    out, inp = w_OxI.shape
    w = w_OxI.astype(jnp.float32).reshape(out, inp // group_size, group_size)
    lo = jnp.minimum(w.min(-1), 0.0)
    hi = jnp.maximum(w.max(-1), 0.0)
    empty = (lo == 0) & (hi == 0)  # GPTQ's rule for an all-zero group
    lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
    scales = ((hi - lo) / MAXQ).astype(jnp.float16)
    s = scales.astype(jnp.float32)
    zeros = jnp.clip(jnp.round(-lo / s), 0, MAXQ)
    q = jnp.clip(jnp.round(w / s[..., None]) + zeros[..., None], 0, MAXQ)
    return q.reshape(out, inp).astype(jnp.uint8), scales, zeros


def pack_nibbles(q_OxI: jax.Array) -> jax.Array:
    """uint8 values 0..15 [out, in] -> [out, in/2], the first of each pair in the high nibble."""
    q = jnp.asarray(q_OxI, jnp.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed_OxH: jax.Array) -> jax.Array:
    p = jnp.asarray(packed_OxH, jnp.uint8)
    return jnp.stack([p >> 4, p & 0xF], axis=-1).reshape(p.shape[0], -1)


def dequantize_int4(packed_OxH, scales_OxG, zeros_OxG, g_idx_I, dtype=jnp.float32) -> jax.Array:
    """W [out, in] = ``scales[:, g] * (q - zeros[:, g])`` with ``g = g_idx`` per input, in
    float32, then cast to ``dtype``."""
    q = unpack_nibbles(packed_OxH).astype(jnp.float32)
    s = jnp.take(scales_OxG.astype(jnp.float32), g_idx_I, axis=1)
    z = jnp.take(zeros_OxG.astype(jnp.float32), g_idx_I, axis=1)
    return (s * (q - z)).astype(dtype)


class Int4Linear(QuantizedLinear):
    """``y = x W^T + b`` with W stored in group-wise INT4 (see the module doc); computes in
    ``dtype``. Frozen like the NF4 layer (its storage is :class:`QuantWeight`); LoRA and
    QA-LoRA target it by its module name."""

    hf_params = {"bias": ("bias", False)}
    quantized = True
    checkpoint_format = "gptq"
    quant_type = "int4"
    double_quant = False

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
                 axes: tuple[str, str], dtype, group_size: int = 128, weight_dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        check_group_size(group_size)
        check_divides(in_features, out_features, group_size, "INT4", "group size")
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.axes = dtype, axes
        self.blocksize = self.group_size = group_size
        self.original_dtype = jnp.dtype(weight_dtype)
        groups = in_features // group_size
        out_axis = axes[1]
        self.packed = QuantWeight(jnp.zeros((out_features, in_features // 2), jnp.uint8),
                                  axes=(out_axis, None))
        self.scales = QuantWeight(jnp.zeros((out_features, groups), jnp.float16),
                                  axes=(out_axis, None))
        self.zeros = QuantWeight(jnp.zeros((out_features, groups), jnp.float32),
                                 axes=(out_axis, None))
        self.g_idx = QuantWeight(jnp.arange(in_features, dtype=jnp.int32) // group_size,
                                 axes=(None,))
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(out_axis,))
                     if use_bias else None)

    def set_int4(self, packed_OxH, scales_OxG, zeros_OxG, g_idx_I=None) -> None:
        want = {"packed": (self.out_features, self.in_features // 2),
                "scales": tuple(self.scales.shape), "zeros": tuple(self.zeros.shape)}
        have = {"packed": tuple(np.shape(packed_OxH)), "scales": tuple(np.shape(scales_OxG)),
                "zeros": tuple(np.shape(zeros_OxG))}
        if have != want:
            raise ValueError(f"INT4 weight shapes {have} do not fit this layer {want}")
        self.packed.set_value(jnp.asarray(packed_OxH, jnp.uint8))
        self.scales.set_value(jnp.asarray(scales_OxG, jnp.float16))
        self.zeros.set_value(jnp.asarray(zeros_OxG, jnp.float32))
        if g_idx_I is not None:
            g = np.asarray(g_idx_I)
            if g.shape != (self.in_features,) or g.min() < 0 or g.max() >= want["scales"][1]:
                raise ValueError(f"g_idx must hold {self.in_features} group indices in "
                                 f"[0, {want['scales'][1]})")
            self.g_idx.set_value(jnp.asarray(g, jnp.int32))

    def contiguous_groups(self) -> bool:
        """Whether input feature i is in group i // group_size (GPTQ without ``desc_act``)."""
        g = np.asarray(jax.device_get(param_value(self.g_idx)))
        return bool(np.array_equal(g, np.arange(self.in_features) // self.group_size))

    def weight_OxI(self, dtype=None) -> jax.Array:
        return dequantize_int4(param_value(self.packed), param_value(self.scales),
                               param_value(self.zeros), param_value(self.g_idx),
                               dtype or self.original_dtype)

    def __call__(self, x):
        w = self.weight_OxI(self.dtype)
        y = jnp.dot(x.astype(self.dtype), w.T)
        if self.bias is not None:
            y = y + param_value(self.bias).astype(self.dtype)
        return y

    def shift_zeros(self, delta_GxO: jax.Array, sign: float = 1.0) -> None:
        """Adds ``sign * delta`` (a change of the weight that is constant within each group,
        given once per group [groups, out] in weight units) by moving the zero points; the
        groups must be contiguous. Exact up to float32 rounding."""
        s = param_value(self.scales).astype(jnp.float32)
        z = param_value(self.zeros)
        self.zeros.set_value(z - sign * delta_GxO.T.astype(jnp.float32) / s)

    def integer_zeros(self) -> bool:
        z = np.asarray(jax.device_get(param_value(self.zeros)))
        return bool(np.all(z == np.round(z)) and z.min() >= 0 and z.max() <= MAXQ)

    def rebuild_kwargs(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    use_bias=self.bias is not None, axes=self.axes, dtype=self.dtype,
                    group_size=self.group_size, weight_dtype=self.weight_dtype)

    @classmethod
    def from_linear(cls, layer: Linear, *, group_size: int = 128, compute_dtype=None,
                    **_) -> Int4Linear:
        """Quantizes a float ``Linear`` (its bias stays in full precision)."""
        kernel_IxO = param_value(layer.kernel)
        q = nnx.eval_shape(lambda: cls(
            layer.in_features, layer.out_features, use_bias=layer.bias is not None,
            axes=layer.weight_axes, dtype=compute_dtype or layer.dtype, group_size=group_size,
            weight_dtype=kernel_IxO.dtype))
        codes, scales, zeros = quantize_int4(kernel_IxO.T, group_size=group_size)
        q.g_idx = QuantWeight(jnp.arange(layer.in_features, dtype=jnp.int32) // group_size,
                              axes=(None,))
        q.set_int4(pack_nibbles(codes), scales, zeros)
        if layer.bias is not None:
            q.bias = layer.bias
        return q

    def quant_state(self):
        raise TypeError("an INT4 layer has no bitsandbytes quant state")


# ------------------------------------------------------------------------------ GPTQ layout
GPTQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
# quantization_config of peftjax's float-zero-point variant: it has no ``quant_method``, so
# transformers refuses to load it (unknown methods it would skip, loading random weights)
FLOAT_ZEROS_FORMAT = "int4_float_zeros"


def _pack_rows_int32(q_RxC: np.ndarray) -> np.ndarray:
    """[R, C] values 0..15 -> int32 [R/8, C]: rows 8j..8j+7 in word j, row 8j in bits 0..3."""
    q = np.asarray(q_RxC, np.uint32).reshape(-1, 8, q_RxC.shape[1])
    word = np.zeros((q.shape[0], q.shape[2]), np.uint32)
    for k in range(8):
        word |= q[:, k] << np.uint32(4 * k)
    return word.view(np.int32)


def _unpack_rows_int32(w_JxC: np.ndarray) -> np.ndarray:
    w = np.asarray(w_JxC).view(np.uint32)
    parts = [(w >> np.uint32(4 * k)) & np.uint32(0xF) for k in range(8)]
    return np.stack(parts, axis=1).reshape(-1, w.shape[1]).astype(np.uint8)


def gptq_tensors(name: str, layer: Int4Linear, float_zeros: bool) -> dict[str, np.ndarray]:
    """The tensors of layer ``name`` in the GPTQ layout (see the module doc). With
    ``float_zeros`` (a model some of whose zero points are no longer integers, after a QA-LoRA
    merge) the zero points are float32 ``X.zeros`` [groups, out] instead of ``X.qzeros``
    (peftjax's variant, :data:`FLOAT_ZEROS_FORMAT`)."""
    get = lambda v: np.asarray(jax.device_get(param_value(v)))  # noqa: E731
    q_OxI = np.asarray(unpack_nibbles(get(layer.packed)))
    out = {name + ".qweight": _pack_rows_int32(q_OxI.T),
           name + ".scales": np.ascontiguousarray(get(layer.scales).T.astype(np.float16)),
           name + ".g_idx": get(layer.g_idx).astype(np.int32)}
    zeros = get(layer.zeros)
    if not float_zeros:
        if not layer.integer_zeros():
            raise ValueError(f"{name}: its zero points are not integers (a QA-LoRA merge); the "
                             "GPTQ layout's qzeros cannot hold them")
        # v1: stored minus one (a zero point of 0 wraps to 15, as GPTQ packs it)
        stored = (zeros.astype(np.int64) - 1) & 0xF
        out[name + ".qzeros"] = _pack_cols_int32(stored.T.astype(np.uint8))
    else:
        out[name + ".zeros"] = np.ascontiguousarray(zeros.T.astype(np.float32))
    if layer.bias is not None:
        out[name + ".bias"] = get(layer.bias)
    return out


def _pack_cols_int32(v_GxO: np.ndarray) -> np.ndarray:
    """[G, O] values 0..15 -> int32 [G, O/8]: columns 8c..8c+7 in word c, 8c in bits 0..3."""
    return np.ascontiguousarray(_pack_rows_int32(np.asarray(v_GxO).T).T)


def _unpack_cols_int32(w_GxC: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_unpack_rows_int32(np.asarray(w_GxC).T).T)


def read_gptq_layer(read, has, name: str, *, bits: int, group_size: int, out_features: int,
                    in_features: int, float_zeros: bool, version: int = 1,
                    sym: bool = False) -> tuple:
    """``(packed [out, in/2], scales [out, groups], zeros [out, groups], g_idx [in])`` of one
    GPTQ layer; ``read(key)``/``has(key)`` access the checkpoint; ``version`` 1 stores zero
    points minus one (``checkpoint_format: gptq``), 2 as they are (``gptq_v2``). A symmetric
    checkpoint's zero points are all 8, so its stored values (7 or 8) decide the version
    whatever the config says (GPTQModel labels converted files inconsistently)."""
    from peftjax.models._safetensors import CheckpointError
    where = f"GPTQ layer {name}"
    if bits != 4:
        raise CheckpointError(f"{where}: bits={bits}; peftjax reads 4-bit GPTQ checkpoints.")
    qweight = np.asarray(read(name + ".qweight"))
    if qweight.dtype != np.int32 or qweight.shape != (in_features // 8, out_features):
        raise CheckpointError(f"{where}: qweight is {qweight.dtype} {qweight.shape}; a "
                              f"{in_features}->{out_features} layer needs int32 "
                              f"{(in_features // 8, out_features)}.")
    scales = np.asarray(read(name + ".scales"))
    groups = scales.shape[0]
    if scales.shape != (groups, out_features) or groups * group_size < in_features:
        raise CheckpointError(f"{where}: scales has shape {scales.shape}, which does not fit "
                              f"{out_features} outputs and group_size {group_size}.")
    if float_zeros:
        zeros = np.asarray(read(name + ".zeros"), np.float32)
    else:
        zeros = _unpack_cols_int32(np.asarray(read(name + ".qzeros"))).astype(np.float32)
        stored = set(np.unique(zeros).tolist())
        if sym and stored in ({7.0}, {8.0}):
            version = 1 if stored == {7.0} else 2
        zeros = (zeros + 1) % 16 if version == 1 else zeros
    if zeros.shape != (groups, out_features):
        raise CheckpointError(f"{where}: zero points have shape {zeros.shape}, scales "
                              f"{scales.shape}.")
    if has(name + ".g_idx"):
        g_idx = np.asarray(read(name + ".g_idx")).astype(np.int32)
    else:
        g_idx = np.arange(in_features, dtype=np.int32) // group_size
    if g_idx.shape != (in_features,) or g_idx.min() < 0 or g_idx.max() >= groups:
        raise CheckpointError(f"{where}: g_idx must give each of the {in_features} inputs a "
                              f"group in [0, {groups}).")
    q_OxI = _unpack_rows_int32(qweight).T
    packed = np.asarray(pack_nibbles(q_OxI))
    return packed, scales.T.astype(np.float16), zeros.T.copy(), g_idx


def gptq_quantization_config(model) -> dict | None:
    """transformers' ``quantization_config`` (a ``GPTQConfig``) for ``model``'s INT4 layers, or
    None without any. When a layer holds real zero points (a QA-LoRA merge) it is peftjax's
    variant instead: ``peftjax_format`` :data:`FLOAT_ZEROS_FORMAT` and no ``quant_method``,
    which transformers refuses to load rather than misreading it."""
    from peftjax.tuners._targets import named_modules
    layers = [m for _, m in named_modules(model) if isinstance(m, Int4Linear)]
    if not layers:
        return None
    sizes = {m.group_size for m in layers}
    if len(sizes) > 1:
        raise ValueError(f"the INT4 layers mix group sizes {sorted(sizes)}; a GPTQ checkpoint "
                         "has one. Re-quantize them with one QuantConfig.")
    desc_act = not all(m.contiguous_groups() for m in layers)
    float_zeros = not all(m.integer_zeros() for m in layers)
    group_size = sizes.pop()
    if float_zeros:
        return {"peftjax_format": FLOAT_ZEROS_FORMAT, "bits": 4, "group_size": group_size,
                "desc_act": desc_act, "zero_points": "float32",
                "note": "INT4 in the GPTQ layout with float32 zero points (X.zeros [groups, out])"
                        " from a QA-LoRA merge; peftjax loads it exactly. "
                        "peftjax.quant.round_zero_points makes a standard GPTQ checkpoint."}
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act,
            "sym": False, "checkpoint_format": "gptq", "true_sequential": True,
            "damp_percent": 0.01, "static_groups": False}


def round_zero_points(model) -> dict:
    """Rounds real zero points (what a QA-LoRA merge leaves) to the nearest integers in 0..15,
    in place, so the model saves as a standard GPTQ checkpoint; returns ``{layer: report}``
    for the layers it changed: ``max_abs`` / ``fro`` of the weight change, ``rel_fro`` that over
    the norm of the weight. Rounding moves each group's values by up to half a scale step,
    which is about the size of a typical adapter's change: prefer peftjax's float-zero layout
    (kept exact) unless a GPTQ runtime must serve the model."""
    from peftjax.tuners._targets import named_modules
    reports = {}
    for name, m in named_modules(model):
        if not isinstance(m, Int4Linear) or m.integer_zeros():
            continue
        z = param_value(m.zeros)
        rounded = jnp.clip(jnp.round(z), 0, MAXQ)
        s = param_value(m.scales).astype(jnp.float32)
        change = s * (z - rounded)  # per (row, group): every weight of the group moves by it
        counts = jnp.bincount(param_value(m.g_idx), length=z.shape[1]).astype(jnp.float32)
        fro = float(jnp.sqrt(jnp.sum(change ** 2 * counts[None, :])))
        norm = float(jnp.linalg.norm(m.weight_OxI(jnp.float32)))
        m.zeros.set_value(rounded)
        reports[name] = {"max_abs": float(jnp.max(jnp.abs(change))), "fro": fro,
                         "rel_fro": fro / max(norm, 1e-30)}
    return reports
