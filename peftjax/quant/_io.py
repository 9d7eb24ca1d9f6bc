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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._layers import Linear
from peftjax.models._safetensors import CheckpointError
from peftjax.quant._formats import CODES, INT4, QuantConfig, QuantState
from peftjax.quant._int4 import Int4Linear
from peftjax.quant._linear import QuantizedLinear, quantization_error
from peftjax.tuners._layer import AdaptedLayer
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
    """A QuantizedLinear (Int4Linear for ``int4``) of ``layer``'s shape with zero storage (call
    it inside ``nnx.eval_shape`` for an abstract one)."""
    if quant_type == INT4:
        return Int4Linear(layer.in_features, layer.out_features, use_bias=layer.bias is not None,
                          axes=layer.weight_axes, dtype=dtype, group_size=blocksize,
                          weight_dtype=weight_dtype, param_dtype=layer.weight_dtype)
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


def bnb_tensors(name: str, layer: QuantizedLinear) -> dict[str, np.ndarray]:
    """The checkpoint tensors transformers + bitsandbytes save for the 4-bit layer ``name``
    (packed weight as a [n/2, 1] uint8 column, absmax, code tables, and the quant_state JSON
    as uint8 bytes); :func:`read_bnb_layer` reads them back."""
    qt = layer.quant_type
    meta = {"quant_type": qt, "blocksize": layer.blocksize,
            "dtype": jnp.dtype(layer.original_dtype).name,
            "shape": [layer.out_features, layer.in_features]}
    get = lambda v: np.asarray(jax.device_get(v[...]))  # noqa: E731
    out = {name + ".weight": get(layer.packed).reshape(-1, 1),
           name + ".weight.absmax": get(layer.absmax).reshape(-1),
           name + ".weight.quant_map": np.asarray(CODES[qt], np.float32)}
    if layer.double_quant:
        out[name + ".weight.nested_absmax"] = get(layer.nested_absmax).astype(np.float32)
        out[name + ".weight.nested_quant_map"] = get(layer.nested_code).astype(np.float32)
        meta.update(nested_blocksize=256, nested_dtype="float32",
                    nested_offset=float(get(layer.offset)))
    out[name + f".weight.quant_state.bitsandbytes__{qt}"] = np.frombuffer(
        json.dumps(meta).encode(), np.uint8).copy()
    return out


def bnb_quantization_config(model: nnx.Module) -> dict | None:
    """transformers' ``quantization_config`` (a ``BitsAndBytesConfig``) for ``model``'s 4-bit
    layers, or None without any. Every float ``Linear`` is listed in ``llm_int8_skip_modules``
    so transformers keeps exactly those in full precision. Raises when the 4-bit layers mix
    settings one config cannot express."""
    quant = [(n, m) for n, m in named_modules(model) if isinstance(m, QuantizedLinear)
             and m.checkpoint_format == "bitsandbytes"]
    if not quant:
        return None
    settings = {(m.quant_type, m.blocksize, m.double_quant, jnp.dtype(m.dtype).name)
                for _, m in quant}
    if len(settings) > 1:
        raise ValueError(f"the 4-bit layers mix settings {sorted(settings)}; a bitsandbytes "
                         "checkpoint has one (quant_type, blocksize, double_quant, compute dtype)."
                         " Re-quantize them with one QuantConfig.")
    (qt, _, dq, compute), = settings  # the blocksize is in each layer's quant_state
    floats = [n for n, m in named_modules(model) if type(m) is Linear]
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": qt, "bnb_4bit_use_double_quant": dq,
            "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": floats or None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def quantize_model(model: nnx.Module, config: QuantConfig, *, progress: bool = True) -> dict:
    """Replaces (in place) the float linear layers ``config`` selects by 4-bit layers and
    returns ``{name: error report}`` (max/mean absolute and relative Frobenius error of the
    dequantized weight); e.g. to store a merged QLoRA model in 4 bits again."""
    from tqdm.auto import tqdm
    reports = {}
    for name in tqdm(quantize_targets(model, config), desc="Quantizing", disable=not progress):
        layer = get_submodule(model, name)
        if config.quant_type == INT4:
            q = Int4Linear.from_linear(layer, group_size=config.blocksize,
                                       compute_dtype=jnp.dtype(config.compute_dtype))
        else:
            q = QuantizedLinear.from_linear(layer, quant_type=config.quant_type,
                                            blocksize=config.blocksize,
                                            double_quant=config.double_quant,
                                            compute_dtype=jnp.dtype(config.compute_dtype),
                                            offset_threads=config.offset_threads)
        reports[name] = quantization_error(layer.kernel[...].T, q.weight_OxI(jnp.float32))
        set_submodule(model, name, q)
    return reports


def merge_and_requantize(peft, config: QuantConfig, *, dtype=None,
                         progress: bool = True) -> tuple[nnx.Module, dict]:
    """Merges a (Q)LoRA ``PeftModel`` and stores the merged layers in 4 bits again; returns
    ``(model, {layer: report})``. Each report is :func:`quantize_model`'s plus ``delta_fro``
    (Frobenius norm of the adapter's change ``scaling * B @ A`` to that layer) and
    ``of_delta`` (the re-quantization error over it). ``of_delta`` near or above 1 means
    rounding to the 4-bit grid undoes about as much as the adapter changed: the 4-bit merged
    model keeps little of what was learned (serve the float merge, or the adapter over the
    4-bit base, instead). Layers whose adapters fold into their INT4 zero points exactly
    (QA-LoRA) are never re-quantized; their report is ``{"folded": True}``."""
    deltas, folded = {}, {}
    for name, layer in peft.lora_layers():
        if layer.quantized and layer.active and layer.folds_into_quantized(layer.active):
            folded[name] = {"folded": True}
        else:
            deltas[name] = float(jnp.linalg.norm(layer.delta_IxO().astype(jnp.float32)))
    model = peft.merge_and_unload(dtype)
    reports = quantize_model(model, config, progress=progress)
    for name, r in reports.items():
        if name in deltas:
            r["delta_fro"] = deltas[name]
            r["of_delta"] = r["fro"] / max(deltas[name], 1e-30)
    return model, {**reports, **folded}


def requantization_summary(reports: dict, quant_type: str) -> str:
    """One line (two with a warning) describing :func:`merge_and_requantize`'s reports."""
    folded = sum(1 for r in reports.values() if r.get("folded"))
    reports = {k: r for k, r in reports.items() if not r.get("folded")}
    parts = []
    if folded:
        parts.append(f"{folded} layers folded into their INT4 zero points exactly (QA-LoRA)")
    if not reports:
        return "; ".join(parts)
    rel = sorted(r["rel_fro"] for r in reports.values())
    of = sorted(r["of_delta"] for r in reports.values() if "of_delta" in r)
    line = (f"quantized {len(rel)} layers to {quant_type} ({len(of)} of them merged): relative "
            f"Frobenius error max {rel[-1]:.4f}, mean {sum(rel) / len(rel):.4f}")
    if of:
        median = of[len(of) // 2]
        line += f"; error / adapter change: median {median:.2f}, max {of[-1]:.2f}"
        if median >= 0.5:
            line += ("\nwarning: rounding to 4 bits undoes much of the adapter's change, so the "
                     "4-bit merged model keeps little of what was learned; serve the float merge "
                     "(or the adapter over the 4-bit base) instead")
    return "; ".join(parts + [line])


def dequantize_model(model: nnx.Module, dtype=None) -> nnx.Module:
    """Replaces (in place) every 4-bit layer without an adapter by a float ``Linear`` (default:
    the dtype the weight had before quantization) and returns the model. Adapted layers are
    left to ``PeftModel.merge_and_unload``."""
    for name, m in list(named_modules(model)):
        if isinstance(m, QuantizedLinear) and not isinstance(m, AdaptedLayer):
            set_submodule(model, name, m.dequantized(dtype))
    return model


def has_quantized(model: nnx.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for _, m in named_modules(model))
