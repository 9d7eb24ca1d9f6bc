"""``QuantizedLinear``: a linear layer whose weight is frozen in bitsandbytes' 4-bit format.

It takes the place (and module name) of the ``Linear`` it replaces, so LoRA's
``target_modules`` select it unchanged and a LoRA layer wraps it like any other linear layer.
Its storage is a distinct variable type, :class:`QuantWeight`, never an ``nnx.Param``: nothing
can mark it trainable, and the optimizer never sees it.

Layout: W [out, in] (PyTorch's) is quantized row-major as bitsandbytes does, so with
``in_features % blocksize == 0`` the bytes are ``packed`` [out, in/2] and the block absmax
values ``absmax`` [out, in/blocksize] (uint8 codes with double quantization, whose nested
absmax, offset and code are stored beside them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.nf4_matmul import nf4_matmul
from peftjax.models._layers import Linear, param_value
from peftjax.quant._formats import (CODES, NESTED_BLOCKSIZE, QuantState, block_scales,
                                    check_format, dequantize_4bit, quantize_4bit)

# the variables of a QuantizedLinear (or Int4Linear) besides ``packed``: quantization state, not
# parameters
STATE_NAMES = ("absmax", "nested_absmax", "offset", "nested_code", "scales", "zeros", "g_idx")


def check_divides(in_features: int, out_features: int, size: int, storage: str,
                  what: str) -> None:
    """Refuses a layer whose input width the quantization block/group ``size`` does not
    divide, naming the way out."""
    if in_features % size:
        raise ValueError(
            f"a {in_features}->{out_features} linear layer cannot be stored in {storage} with "
            f"{what} {size}: in_features must be a multiple of the {what}. Keep this layer in "
            f"full precision (QuantConfig.skip_modules) or pick a {what} that divides it.")


class QuantWeight(nnx.Variable):
    """Frozen 4-bit storage (packed codes and their quantization state)."""


class QuantizedLinear(Linear):
    """``y = x W^T + b`` with W stored in NF4/FP4; computes in ``dtype``.

    Built empty (zeros of the right shapes, e.g. inside ``nnx.eval_shape``) and filled by
    :meth:`set_quantized`, or made from a float layer with :meth:`from_linear`.
    """

    hf_params = {"bias": ("bias", False)}  # the 4-bit weight is read and written by quant/_io
    quantized = True
    checkpoint_format = "bitsandbytes"  # how save_pretrained writes it (Int4Linear: "gptq")

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
                 axes: tuple[str, str], dtype, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, weight_dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        """``weight_dtype``: the dtype W had before quantization (what dequantization gives);
        ``param_dtype``: the bias's; ``rngs`` is unused (nothing is random)."""
        check_format(quant_type, blocksize)
        check_divides(in_features, out_features, blocksize, "4 bits", "blocksize")
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.axes = dtype, axes
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.original_dtype = jnp.dtype(weight_dtype)
        n_blocks = out_features * in_features // blocksize
        out_axis = axes[1]
        self.packed = QuantWeight(jnp.zeros((out_features, in_features // 2), jnp.uint8),
                                  axes=(out_axis, None))
        self.absmax = QuantWeight(jnp.zeros((out_features, in_features // blocksize),
                                            jnp.uint8 if double_quant else jnp.float32),
                                  axes=(out_axis, None))
        if double_quant:
            self.nested_absmax = QuantWeight(jnp.zeros((-(-n_blocks // NESTED_BLOCKSIZE),),
                                                       jnp.float32), axes=(None,))
            self.offset = QuantWeight(jnp.zeros((), jnp.float32), axes=())
            self.nested_code = QuantWeight(jnp.zeros((256,), jnp.float32), axes=(None,))
        else:
            self.nested_absmax = self.offset = self.nested_code = None
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(out_axis,))
                     if use_bias else None)

    # -- state -------------------------------------------------------------------------------

    def quant_state(self) -> QuantState:
        dq = self.double_quant
        return QuantState(
            absmax=param_value(self.absmax).reshape(-1),
            nested_absmax=param_value(self.nested_absmax) if dq else None,
            offset=param_value(self.offset) if dq else None,
            nested_code=param_value(self.nested_code) if dq else None,
            shape=(self.out_features, self.in_features), dtype=self.original_dtype,
            quant_type=self.quant_type, blocksize=self.blocksize)

    def set_quantized(self, packed, state: QuantState) -> None:
        """Stores bitsandbytes-layout ``packed`` bytes and ``state`` for W [out, in]."""
        want = (self.out_features, self.in_features)
        if tuple(state.shape) != want:
            raise ValueError(f"quantized weight has shape {tuple(state.shape)}, the layer needs "
                             f"{want}")
        if (state.quant_type, state.blocksize, state.double_quant) != (
                self.quant_type, self.blocksize, self.double_quant):
            raise ValueError(
                f"quantized weight is {state.quant_type}/blocksize {state.blocksize}/double_quant="
                f"{state.double_quant}; the layer was built for {self.quant_type}/"
                f"{self.blocksize}/{self.double_quant}")
        self.packed.set_value(jnp.asarray(packed, jnp.uint8).reshape(self.out_features, -1))
        self.absmax.set_value(jnp.asarray(state.absmax).reshape(self.out_features, -1))
        if self.double_quant:
            self.nested_absmax.set_value(jnp.asarray(state.nested_absmax, jnp.float32).reshape(-1))
            self.offset.set_value(jnp.asarray(state.offset, jnp.float32).reshape(()))
            self.nested_code.set_value(jnp.asarray(state.nested_code, jnp.float32))
        self.original_dtype = jnp.dtype(state.dtype)

    def weight_OxI(self, dtype=None) -> jax.Array:
        """W [out, in] dequantized (bitsandbytes' ``dequantize_4bit``)."""
        return dequantize_4bit(param_value(self.packed), self.quant_state(), dtype)

    def scales_OxB(self) -> jax.Array:
        """Float32 absmax of every block [out, in/blocksize], double quantization undone."""
        return block_scales(self.quant_state()).reshape(self.out_features, -1)

    @property
    def weight_axes(self) -> tuple:
        return tuple(self.axes)

    @property
    def weight_dtype(self):
        return self.original_dtype

    def __call__(self, x):
        y = nf4_matmul(x.astype(self.dtype), param_value(self.packed), self.scales_OxB(),
                       code=CODES[self.quant_type], blocksize=self.blocksize, dtype=self.dtype)
        if self.bias is not None:
            y = y + param_value(self.bias).astype(self.dtype)
        return y

    def rebuild_kwargs(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    use_bias=self.bias is not None, axes=self.axes, dtype=self.dtype,
                    quant_type=self.quant_type, blocksize=self.blocksize,
                    double_quant=self.double_quant, weight_dtype=self.weight_dtype)

    # -- conversion --------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, layer: Linear, *, quant_type="nf4", blocksize=64, double_quant=True,
                    compute_dtype=None, offset_threads=1, quantized=None) -> QuantizedLinear:
        """Quantizes a float ``Linear``/``Conv1D`` (its bias stays in full precision);
        ``quantized=(packed, state)`` takes a weight quantized elsewhere (LoftQ) instead."""
        kernel_IxO = param_value(layer.kernel)
        q = nnx.eval_shape(lambda: cls(
            layer.in_features, layer.out_features, use_bias=layer.bias is not None,
            axes=layer.weight_axes, dtype=compute_dtype or layer.dtype, quant_type=quant_type,
            blocksize=blocksize, double_quant=double_quant, weight_dtype=kernel_IxO.dtype))
        packed, state = quantized or quantize_4bit(
            kernel_IxO.T, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
            offset_threads=offset_threads)
        q.set_quantized(packed, state)
        if layer.bias is not None:
            q.bias = layer.bias
        return q

    def dequantized(self, dtype=None) -> Linear:
        """A float ``Linear`` with this layer's (dequantized) weight and bias."""
        dtype = jnp.dtype(dtype or self.original_dtype)
        plain = nnx.eval_shape(lambda: Linear(
            self.in_features, self.out_features, use_bias=self.bias is not None, axes=self.axes,
            dtype=self.dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
        plain.kernel = nnx.Param(self.weight_OxI(dtype).T, axes=self.axes)
        plain.bias = self.bias
        return plain


def quantization_error(w_OxI: jax.Array, w_hat_OxI: jax.Array) -> dict:
    """``{max_abs, mean_abs, fro, rel_fro}`` of ``w_hat - w`` (float32; ``fro`` is the
    Frobenius norm of the error, ``rel_fro`` that over the norm of ``w``)."""
    w = w_OxI.astype(jnp.float32)
    err = w_hat_OxI.astype(jnp.float32) - w
    fro = jnp.linalg.norm(err)
    return {"max_abs": float(jnp.max(jnp.abs(err))), "mean_abs": float(jnp.mean(jnp.abs(err))),
            "fro": float(fro), "rel_fro": float(fro / jnp.maximum(jnp.linalg.norm(w), 1e-30))}


__all__ = ["STATE_NAMES", "QuantWeight", "QuantizedLinear", "quantization_error"]
