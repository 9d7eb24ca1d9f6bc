"""Putting 4-bit layers into a model: at load time (quantize-on-load, or bitsandbytes
checkpoints saved by transformers) and on a model in memory (``quantize_model``,
``dequantize_model``).

A bitsandbytes checkpoint stores, for a layer ``X``: ``X.weight`` (packed bytes [n/2, 1]),
``X.weight.absmax``, ``X.weight.quant_map``, with double quantization also
``X.weight.nested_absmax`` and ``X.weight.nested_quant_map``, and
``X.weight.quant_state.bitsandbytes__<nf4|fp4>``: JSON bytes with quant_type, blocksize, dtype,
shape and ``nested_offset``.
"""

from __future__ import annotations

import json
import logging
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._layers import Linear
from peftjax.models._safetensors import CheckpointError
from peftjax.quant._formats import CODES, QuantConfig, QuantState
from peftjax.quant._linear import QuantizedLinear, quantization_error
from peftjax.tuners._lora import is_lora_layer
from peftjax.tuners._targets import get_submodule, named_modules, set_submodule

log = logging.getLogger("peftjax")
_STATE_KEY = re.compile(r"^(?P<layer>.+)\.weight\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")
_BNB_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
                 ".weight.nested_quant_map")


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def quantize_targets(model: nnx.Module, config: QuantConfig) -> list[str]:
    """Names of the plain ``Linear`` layers ``config`` stores in 4 bits (GPT-2's Conv1D and the
    ``skip_modules`` stay in full precision; so does a layer whose input width the blocksize
    does not divide, with a warning)."""
    names = []
    for name, m in named_modules(model):
        if type(m) is not Linear or _skipped(name, config.skip_modules):
            continue
        if m.in_features % config.blocksize:
            log.warning("%s: in_features=%d is not a multiple of blocksize %d; kept in full "
                        "precision", name, m.in_features, config.blocksize)
            continue
        names.append(name)
    return names


def empty_quantized(layer: Linear, *, quant_type, blocksize, double_quant, dtype, weight_dtype):
    """A QuantizedLinear of ``layer``'s shape with zero storage (call it inside
    ``nnx.eval_shape`` for an abstract one)."""
    return QuantizedLinear(layer.in_features, layer.out_features, use_bias=layer.bias is not None,
                           axes=layer.weight_axes, dtype=dtype, quant_type=quant_type,
                           blocksize=blocksize, double_quant=double_quant,
                           weight_dtype=weight_dtype, param_dtype=layer.weight_dtype)


def swap_in_quantized(model: nnx.Module, config: QuantConfig, weight_dtype) -> dict[str, tuple]:
    """Replaces (in place) the layers ``config`` selects by abstract (shape-only) 4-bit layers;
    returns ``{name: (out_features, in_features)}``. Raises when it selects nothing
    (quantization would silently do nothing)."""
    out = {}
    for name in quantize_targets(model, config):
        layer = get_submodule(model, name)
        set_submodule(model, name, nnx.eval_shape(lambda: empty_quantized(
            layer, quant_type=config.quant_type, blocksize=config.blocksize,
            double_quant=config.double_quant, dtype=jnp.dtype(config.compute_dtype),
            weight_dtype=weight_dtype)))
        out[name] = (layer.out_features, layer.in_features)
    if not out:
        raise ValueError(f"quantization selects no layer of {type(model).__name__}: 4-bit storage "
                         "applies to Linear layers (not GPT-2's Conv1D) outside skip_modules="
                         f"{list(config.skip_modules)} whose input width the blocksize "
                         f"({config.blocksize}) divides.")
    return out


def bnb_layers(keys) -> dict[str, str]:
    """``{layer name: quant_type}`` for the bitsandbytes 4-bit layers among checkpoint keys."""
    out = {}
    for k in keys:
        m = _STATE_KEY.match(k)
        if m:
            out[m.group("layer")] = m.group("type")
    return out


def bnb_keys(layer: str, quant_type: str) -> list[str]:
    return [layer + ".weight", layer + f".weight.quant_state.bitsandbytes__{quant_type}"] + [
        layer + s for s in _BNB_SUFFIXES]


def bnb_meta(read, layer: str, quant_type: str) -> dict:
    raw = read(layer + f".weight.quant_state.bitsandbytes__{quant_type}")
    try:
        return json.loads(bytes(np.asarray(raw, np.uint8)).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{layer}: its bitsandbytes quant_state is not valid JSON ({e}); "
                              "the checkpoint is corrupt.") from e


def read_bnb_layer(read, has, layer: str, quant_type: str) -> tuple[np.ndarray, QuantState]:
    """``(packed bytes, QuantState)`` of one bitsandbytes 4-bit layer; ``read(key)`` returns
    the checkpoint tensor, ``has(key)`` whether it exists."""
    meta = bnb_meta(read, layer, quant_type)
    where = f"{layer} (bitsandbytes {quant_type})"
    quant_map = np.asarray(read(layer + ".weight.quant_map"), np.float32)
    if not np.array_equal(quant_map, CODES[quant_type]):
        raise CheckpointError(f"{where}: its quant_map is not bitsandbytes' {quant_type} code; "
                              "peftjax reads only the standard NF4/FP4 tables.")
    nested = has(layer + ".weight.nested_absmax")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(
        meta.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{where}: unsupported original dtype {meta.get('dtype')!r}.")
    if nested and meta.get("nested_blocksize", 256) != 256:
        raise CheckpointError(f"{where}: nested_blocksize={meta['nested_blocksize']}; only 256 "
                              "(bitsandbytes' value) is supported.")
    state = QuantState(
        absmax=jnp.asarray(read(layer + ".weight.absmax")),
        nested_absmax=jnp.asarray(read(layer + ".weight.nested_absmax"), jnp.float32) if nested else None,
        offset=jnp.asarray(np.float32(meta["nested_offset"])) if nested else None,
        nested_code=jnp.asarray(read(layer + ".weight.nested_quant_map"), jnp.float32) if nested else None,
        shape=tuple(meta["shape"]), dtype=dtype, quant_type=quant_type,
        blocksize=int(meta["blocksize"]))
    return np.asarray(read(layer + ".weight")), state


def quantize_model(model: nnx.Module, config: QuantConfig, *, progress: bool = True) -> dict:
    """Replaces (in place) the float linear layers ``config`` selects by 4-bit layers and
    returns ``{name: error report}`` (max/mean absolute and relative Frobenius error of the
    dequantized weight); e.g. to store a merged QLoRA model in 4 bits again."""
    from tqdm.auto import tqdm
    reports = {}
    for name in tqdm(quantize_targets(model, config), desc="Quantizing", disable=not progress):
        layer = get_submodule(model, name)
        q = QuantizedLinear.from_linear(layer, quant_type=config.quant_type,
                                        blocksize=config.blocksize,
                                        double_quant=config.double_quant,
                                        compute_dtype=jnp.dtype(config.compute_dtype),
                                        offset_threads=config.offset_threads)
        reports[name] = quantization_error(layer.kernel[...].T, q.weight_OxI(jnp.float32))
        set_submodule(model, name, q)
    return reports


def dequantize_model(model: nnx.Module, dtype=None) -> nnx.Module:
    """Replaces (in place) every 4-bit layer without an adapter by a float ``Linear`` (default:
    the dtype the weight had before quantization) and returns the model. Adapted layers are
    left to ``PeftModel.merge_and_unload``."""
    for name, m in list(named_modules(model)):
        if isinstance(m, QuantizedLinear) and not is_lora_layer(m):
            set_submodule(model, name, m.dequantized(dtype))
    return model


def has_quantized(model: nnx.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for _, m in named_modules(model))
