"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) with the semantics and files of
AdapterHub's ``adapters`` package (``DoubleSeqBnConfig`` = Houlsby, ``SeqBnConfig`` = Pfeiffer).

A small module sits where a sublayer's output ``h`` joins the residual stream ``x`` (after the
attention block: ``mh_adapter``; after the feed-forward block: ``output_adapter``)::

    a(z) = dropout(scaling * up(act(down(z))))          down: d -> d / reduction_factor -> d

Houlsby (adapters after both blocks, ``original_ln_before=False``): ``join(h + a(h), x)``.
Pfeiffer (after the feed-forward block only, ``original_ln_before=True``):
``join(h + a(join(h, x)), x)``, where ``join(h, x)`` is ``norm(h + x)`` in a post-norm block
(BERT, with the block's own LayerNorm) and ``h + x`` in a pre-norm block (Llama, GPT-2). With
``residual_before_ln=False`` the adapter's residual is its input instead of ``h``; with
``original_ln_after=False`` the final join is left out. Adapters are placed through
``peftjax.models._layers.join_residual``, so every family works (BERT, RoBERTa, Llama, Mistral,
Qwen, Gemma, GPT-2).

``init_weights``: ``"mam_adapter"`` (peftjax's default: down kaiming-uniform, up zero, so the
model starts as the base model), ``"bert"`` (AdapterHub's default: both N(0, 0.02), so its
adapters change the outputs from the start) or ``"houlsby"`` (both truncated N(0, 0.01)).

Files are AdapterHub's: ``adapter_config.json`` (``{"config": {...}, "name", "version",
"model_type", "model_class", "hidden_size", ...}``), ``adapter.safetensors`` with keys relative to
the backbone (``encoder.layer.0.output.adapters.<name>.adapter_down.0.weight`` for BERT,
``layers.0.output_adapters.adapters.<name>.adapter_up.bias`` for Llama), and a trained head in
``head_config.json`` + ``model_head.safetensors``. AdapterHub loads them with
``model.load_adapter(dir, use_safetensors=True)``; its default ``pytorch_adapter.bin`` files load
here when torch is installed. Options of AdapterHub's ``BnConfig`` that are not implemented
(parallel adapters, gating, PHM/Compacter, invertible adapters, extra LayerNorms inside the
adapter, stochastic depth) are refused by name, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._layers import ACTIVATIONS, add_residual, dropout, param_value
from peftjax.tuners._base import (TASK_TYPES, AdapterParam, TunerConfig, as_tuple, in_modules,
                                  register)
from peftjax.tuners._layer import call_with_adapter_dropout, site_key, site_of
from peftjax.tuners._targets import get_submodule, named_modules

ARCHITECTURES = {  # AdapterHub's SeqBnConfig / DoubleSeqBnConfig defaults
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, non_linearity="relu",
                     original_ln_before=True),
    "houlsby": dict(mh_adapter=True, output_adapter=True, non_linearity="swish",
                    original_ln_before=False),
}
INITS = ("mam_adapter", "bert", "houlsby")
SITES = {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"}
# AdapterHub BnConfig fields that must keep these values (features not implemented here)
_MUST_BE = {"is_parallel": (False,), "use_gating": (False,), "phm_layer": (False,),
            "inv_adapter": (None,), "ln_before": (False,), "ln_after": (False,),
            "cross_adapter": (False,), "stochastic_depth": (0, 0.0)}
_HARMLESS = {  # only matter with the features above, or only for initial values
    "adapter_residual_before_ln", "inv_adapter_reduction_factor", "init_weights_seed",
    "factorized_phm_W", "shared_W_phm",
    "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm",
    "hypercomplex_nonlinearity", "phm_rank", "phm_bias", "phm_dim", "architecture"}
# the models' activations plus the other names AdapterHub accepts
_ACT = {**ACTIVATIONS, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid,
        "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01)}
VERSION = "adapters.1.3.0"  # the AdapterHub format version the files are written as


class BottleneckParam(AdapterParam):
    """A bottleneck adapter's projections (and a learned scaling)."""


class BottleneckAdapter(nnx.Module):
    """One adapter at one site: ``down`` [d, m] + bias, ``up`` [m, d] + bias."""

    def __init__(self, hidden: int, config: BottleneckConfig, down_size: int, *, site: int,
                 rngs: nnx.Rngs):
        c = config
        self.act, self.dropout_rate, self.site = c.non_linearity.lower(), float(c.dropout), site
        self.residual_before_ln = c.residual_before_ln
        self.original_ln_before = c.original_ln_before
        self.original_ln_after = c.original_ln_after
        k_d, k_u = rngs.params(), rngs.params()
        if c.init_weights == "bert":
            down = 0.02 * jax.random.normal(k_d, (hidden, down_size))
            up = 0.02 * jax.random.normal(k_u, (down_size, hidden))
        elif c.init_weights == "houlsby":
            down = 0.01 * jax.random.truncated_normal(k_d, -2.0, 2.0, (hidden, down_size))
            up = 0.01 * jax.random.truncated_normal(k_u, -2.0, 2.0, (down_size, hidden))
        else:  # mam_adapter: kaiming_uniform(a=sqrt(5)) down, zero up
            bound = 1.0 / math.sqrt(hidden)
            down = jax.random.uniform(k_d, (hidden, down_size), minval=-bound, maxval=bound)
            up = jnp.zeros((down_size, hidden))
        self.down_kernel = BottleneckParam(down.astype(jnp.float32), axes=("embed", None))
        self.down_bias = BottleneckParam(jnp.zeros((down_size,)), axes=(None,))
        self.up_kernel = BottleneckParam(up.astype(jnp.float32), axes=(None, "embed"))
        self.up_bias = BottleneckParam(jnp.zeros((hidden,)), axes=("embed",))
        if c.scaling == "learned":
            self.scaling = BottleneckParam(jnp.ones((1,)), axes=(None,))
        elif c.scaling == "channel":
            self.scaling = BottleneckParam(jnp.ones((hidden,)), axes=("embed",))
        else:
            self.scaling = float(c.scaling)

    def __call__(self, h, x, norm):
        """The join of ``h`` into ``x`` with this adapter (AdapterHub's ``pre_forward``,
        ``forward`` and ``post_forward`` of a sequential bottleneck)."""
        dt = h.dtype
        residual = h if self.residual_before_ln is True else None
        z = h
        if self.original_ln_before:
            z = h + x
            if self.residual_before_ln == "post_add":
                residual = z
            if norm is not None:
                z = norm(z)
        if self.residual_before_ln is False:
            residual = z
        t = jnp.dot(z, param_value(self.down_kernel).astype(dt)) + param_value(
            self.down_bias).astype(dt)
        t = _ACT[self.act](t)
        up = jnp.dot(t, param_value(self.up_kernel).astype(dt)) + param_value(
            self.up_bias).astype(dt)
        s = self.scaling if isinstance(self.scaling, float) else param_value(self.scaling)
        out = dropout(up * jnp.asarray(s, dt), self.dropout_rate, site_key(self.site))
        out = out + residual
        if self.original_ln_after:
            out = norm(out + x) if norm is not None else out + x
        return out


class BottleneckSite(nnx.Module):
    """The module a block holds at a residual join (``attention_adapters`` /
    ``output_adapters``): named adapters and which one the forward pass applies."""

    def __init__(self):
        self.adapters = nnx.Dict()
        self.active: tuple[str, ...] = ()

    def __call__(self, h, x, norm):
        if not self.active:
            return add_residual(h, x, norm)
        return self.adapters[self.active[0]](h, x, norm)


def _blocks(model) -> list[tuple[str, int, str, nnx.Module]]:
    """``[(block name, layer index, family, block)]`` for every transformer block."""
    from peftjax.models._decoder import DecoderLayer
    from peftjax.models.bert import BertLayer
    from peftjax.models.gpt2 import GPT2Block
    kinds = ((BertLayer, "bert"), (DecoderLayer, "decoder"), (GPT2Block, "gpt2"))
    out = []
    for name, m in named_modules(model):
        for cls, family in kinds:
            if isinstance(m, cls):
                out.append((name, int(name.rsplit(".", 1)[-1]), family, m))
    return out


def _sites(model):
    """``[(block name, family, site attribute, BottleneckSite)]`` present in ``model``."""
    out = []
    for name, _, family, block in _blocks(model):
        for attr in SITES.values():
            site = getattr(block, attr, None)
            if isinstance(site, BottleneckSite):
                out.append((name, family, attr, site))
    return out


def _hub_prefix(block_name: str, family: str, attr: str, backbone: str | None) -> str:
    """AdapterHub's key prefix (relative to the backbone) of a site's adapters."""
    rel = block_name
    if backbone and rel.startswith(backbone + "."):
        rel = rel[len(backbone) + 1:]
    if family == "bert":  # AdapterHub's BERT puts them into the SelfOutput / Output modules
        return f"{rel}.{'attention.output' if attr == 'attention_adapters' else 'output'}.adapters"
    return f"{rel}.{attr}.adapters"


def _backbone(model) -> str | None:
    return getattr(model, "base_model_prefix", None) if hasattr(model, "backbone") else None


@register
@dataclasses.dataclass(frozen=True)
class BottleneckConfig(TunerConfig):
    """Bottleneck adapters with AdapterHub's ``BnConfig`` names and meaning (see the module doc).

    ``architecture``: ``"pfeiffer"`` (AdapterHub ``SeqBnConfig``: after the feed-forward block,
    ReLU, ``original_ln_before=True``) or ``"houlsby"`` (``DoubleSeqBnConfig``: after attention
    and after the feed-forward block, swish); fields left None take the architecture's value.
    ``reduction_factor``: d / bottleneck size (a number, or a mapping from layer index as a
    string, with ``"default"``, to a number); ``leave_out``: layer indices without adapters;
    ``scaling``: a number, ``"learned"`` (one trained scalar) or ``"channel"`` (one per
    feature); ``dropout`` on the adapter's output; ``modules_to_save`` / ``task_type`` as PEFT's.
    """

    architecture: str = "pfeiffer"
    reduction_factor: Any = 16
    non_linearity: str | None = None
    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    original_ln_before: bool | None = None
    original_ln_after: bool = True
    residual_before_ln: Any = True
    init_weights: str = "mam_adapter"
    scaling: Any = 1.0
    dropout: float = 0.0
    leave_out: Any = ()
    modules_to_save: Any = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    method = "bottleneck"
    peft_type = "BOTTLENECK"
    merge_reason = ("a bottleneck adapter is a nonlinear module between layers, not a change "
                    "of a weight.")
    weight_files = ("adapter.safetensors", "model_head.safetensors")
    # what AdapterHub writes by default instead (PyTorch pickles)
    weight_fallbacks = {"adapter.safetensors": "pytorch_adapter.bin",
                        "model_head.safetensors": "pytorch_model_head.bin"}

    def __post_init__(self):
        problems = []
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture={self.architecture!r} must be one of "
                            f"{sorted(ARCHITECTURES)}")
        else:
            for k, v in ARCHITECTURES[self.architecture].items():
                if getattr(self, k) is None:
                    object.__setattr__(self, k, v)
        object.__setattr__(self, "leave_out", tuple(sorted(self.leave_out or ())))
        object.__setattr__(self, "modules_to_save", as_tuple(self.modules_to_save))
        if isinstance(self.reduction_factor, dict):
            object.__setattr__(self, "reduction_factor",
                               {str(k): v for k, v in self.reduction_factor.items()})
            factors = list(self.reduction_factor.values())
        else:
            factors = [self.reduction_factor]
        if not all(isinstance(f, (int, float)) and f > 0 for f in factors):
            problems.append(f"reduction_factor={self.reduction_factor!r} must be a number > 0 "
                            "or a mapping from layer index (and 'default') to one")
        if str(self.non_linearity).lower() not in _ACT:
            problems.append(f"non_linearity={self.non_linearity!r} must be one of {sorted(_ACT)}")
        if not (self.mh_adapter or self.output_adapter):
            problems.append("mh_adapter and output_adapter are both False: no adapter to place")
        if self.residual_before_ln not in (True, False, "post_add"):
            problems.append(f"residual_before_ln={self.residual_before_ln!r} must be True, False "
                            "or 'post_add'")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            problems.append("residual_before_ln='post_add' needs original_ln_before=True")
        if self.init_weights not in INITS:
            problems.append(f"init_weights={self.init_weights!r} must be one of {INITS}")
        if not (isinstance(self.scaling, (int, float)) or self.scaling in ("learned", "channel")):
            problems.append(f"scaling={self.scaling!r} must be a number, 'learned' or 'channel'")
        elif isinstance(self.scaling, int):
            object.__setattr__(self, "scaling", float(self.scaling))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r} must be one of {TASK_TYPES}")
        if problems:
            raise ValueError("invalid BottleneckConfig: " + "; ".join(problems) + ".")

    def down_size(self, hidden: int, layer: int) -> int:
        """AdapterHub's bottleneck size: ``int(hidden // reduction_factor)``, at least 1."""
        f = self.reduction_factor
        if isinstance(f, dict):
            f = f.get(str(layer), f.get("default"))
            if f is None:
                raise ValueError(f"reduction_factor has no entry for layer {layer} and no "
                                 "'default'")
        return max(1, int(hidden // f))

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        blocks = _blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no transformer blocks peftjax knows "
                             "(BERT/RoBERTa, Llama-style decoders, GPT-2)")
        hidden = model.config.hidden_size
        bad = [i for i in self.leave_out if i not in {b[1] for b in blocks}]
        if bad:
            raise ValueError(f"leave_out={list(self.leave_out)}: the model has no layer {bad}")
        for name, index, _, block in blocks:
            if index in self.leave_out:
                continue
            for flag, attr in SITES.items():
                if not getattr(self, flag):
                    continue
                site = getattr(block, attr, None)
                if site is None:
                    site = BottleneckSite()
                    setattr(block, attr, site)
                site.adapters[adapter_name] = BottleneckAdapter(
                    hidden, self, self.down_size(hidden, index),
                    site=site_of(f"{name}.{attr}", adapter_name), rngs=rngs)
        return {}

    def activate(self, peft_model, names: tuple) -> None:
        for _, _, _, site in _sites(peft_model.base_model):
            site.active = tuple(n for n in names if n in site.adapters)

    def remove(self, peft_model, adapter_name: str) -> None:
        model = peft_model.base_model
        for name, _, attr, site in _sites(model):
            if adapter_name in site.adapters:
                del site.adapters[adapter_name]
                site.active = tuple(n for n in site.active if n != adapter_name)
                if not len(site.adapters):
                    delattr(get_submodule(model, name), attr)

    def unload(self, peft_model):
        model = peft_model.base_model
        for name, _, attr, _ in _sites(model):
            delattr(get_submodule(model, name), attr)
        return model

    def call(self, peft_model, args, kwargs):
        return call_with_adapter_dropout(peft_model, args, kwargs)

    def trains(self, path, var, peft_model) -> bool:
        return in_modules(path, var, self.modules_to_save)

    # ------------------------------------------------------------------ AdapterHub's files
    def peft_entries(self, peft_model) -> dict:
        """AdapterHub's keys (relative to the backbone) -> ``(variable, transposed)``; trained
        base weights (a head) under their Hugging Face names, for ``model_head.safetensors``."""
        adapter = peft_model.active_adapter
        model = peft_model.base_model
        backbone = _backbone(model)
        out = {}
        for name, family, attr, site in _sites(model):
            if adapter not in site.adapters:
                continue
            a = site.adapters[adapter]
            p = f"{_hub_prefix(name, family, attr, backbone)}.{adapter}"
            out[f"{p}.adapter_down.0.weight"] = (a.down_kernel, True)
            out[f"{p}.adapter_down.0.bias"] = (a.down_bias, False)
            out[f"{p}.adapter_up.weight"] = (a.up_kernel, True)
            out[f"{p}.adapter_up.bias"] = (a.up_bias, False)
            if not isinstance(a.scaling, float):
                out[f"{p}.scaling"] = (a.scaling, False)
        for key, entry in peft_model.trained_base_entries().items():
            out[key.removeprefix("base_model.model.")] = entry
        return out

    def weight_file(self, key: str) -> str:
        """Adapter tensors (``...adapters.<name>...``) and the head's, in AdapterHub's files."""
        return self.weight_files[0] if ".adapters." in key else self.weight_files[1]

    def stored_key(self, key: str) -> str | None:
        """Matching ignores the adapter's name in the keys (a file saved as ``"sst2"`` loads
        under any name) and, for the adapter file, a backbone prefix (``bert.``) that
        AdapterHub writes when the model has a head. AdapterHub stores a causal LM's output
        head (``lm_head``: the base model's weights, which adapter training leaves alone)
        beside every adapter; it is not part of the adapter and is not loaded (None)."""
        if key.startswith("lm_head."):
            return None
        key = re.sub(r"\.adapters\.[^.]+\.(adapter_down|adapter_up|scaling)",
                     r".adapters.*.\1", key)
        if ".adapters." in key:
            key = re.sub(r"^(bert|roberta|model|transformer)\.", "", key)
        return key

    def file_dict(self, peft_model) -> dict:
        model = peft_model.base_model
        cfg = {k: getattr(self, k) for k in (
            "mh_adapter", "output_adapter", "reduction_factor", "non_linearity",
            "original_ln_before", "original_ln_after", "residual_before_ln", "init_weights",
            "scaling", "dropout")}
        cfg.update({k: ok[0] for k, ok in _MUST_BE.items()}, leave_out=list(self.leave_out),
                   adapter_residual_before_ln=False, inv_adapter_reduction_factor=None,
                   init_weights_seed=None)
        return {"config": cfg, "hidden_size": model.config.hidden_size,
                "model_class": _model_class(model),
                "model_name": self.base_model_name_or_path or "",
                "model_type": model.config.model_type, "name": peft_model.active_adapter,
                "version": VERSION,
                # peftjax's, ignored by AdapterHub: what the adapter was trained for
                "peftjax": {"architecture": self.architecture, "task_type": self.task_type,
                            "modules_to_save": list(self.modules_to_save or ())}}

    def extra_files(self, peft_model) -> dict:
        """``head_config.json`` when the adapter trained a head (AdapterHub's static-head
        format)."""
        if not peft_model.trained_base_entries():
            return {}
        model = peft_model.base_model
        labels = getattr(model.config, "num_labels", None)
        return {"head_config.json": {
            "config": None, "hidden_size": model.config.hidden_size,
            "label2id": {f"LABEL_{i}": i for i in range(labels or 0)},
            "model_class": _model_class(model), "model_name": self.base_model_name_or_path or "",
            "model_type": model.config.model_type, "name": None, "num_labels": labels,
            "version": VERSION}}

    @classmethod
    def claims(cls, data: dict) -> bool:
        return "peft_type" not in data and isinstance(data.get("config"), dict) and \
            str(data.get("version", "")).startswith("adapters.")

    def to_peft_dict(self) -> dict:
        raise TypeError("bottleneck adapters are written in AdapterHub's format "
                        "(save_pretrained), not PEFT's")

    @classmethod
    def from_peft_dict(cls, data: dict, path: str) -> BottleneckConfig:
        """Reads AdapterHub's ``adapter_config.json`` (AdapterHub's or ours)."""
        if not cls.claims(data):
            return super().from_peft_dict(data, path)
        c = dict(data["config"])
        arch = c.pop("architecture", None)
        if arch not in (None, "bottleneck", "union"):
            raise ValueError(f"{path}: an AdapterHub {arch!r} adapter; peftjax reads AdapterHub's "
                             "bottleneck adapters (seq_bn / double_seq_bn); for LoRA, prefix "
                             "tuning, (IA)³ use PEFT's files")
        bad = {k: c[k] for k, ok in _MUST_BE.items() if k in c and c[k] not in ok}
        if bad:
            raise ValueError(f"{path}: uses AdapterHub features not implemented in peftjax: "
                             f"{bad}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(c) - fields - set(_MUST_BE) - _HARMLESS)
        if unknown:
            raise ValueError(f"{path}: unknown adapter options {unknown}")
        ours = data.get("peftjax") or {}
        kw = {k: v for k, v in c.items() if k in fields}
        if isinstance(kw.get("init_weights"), str) and kw["init_weights"] not in INITS:
            kw["init_weights"] = "mam_adapter"  # initial values only; weights are loaded
        kw["architecture"] = ours.get("architecture") or (
            "houlsby" if c.get("mh_adapter") else "pfeiffer")
        head = ours.get("modules_to_save") or _head_modules(os.path.dirname(path))
        return cls(**kw, modules_to_save=head, task_type=ours.get("task_type"),
                   base_model_name_or_path=data.get("model_name") or None)


def _model_class(model) -> str:
    """The Hugging Face class name of ``model`` (AdapterHub records it)."""
    from peftjax.models._loading import architecture_name, task_of
    try:
        return architecture_name(model.config.model_type, task_of(model))
    except (KeyError, StopIteration):
        return type(model).__name__


def _head_modules(directory: str) -> tuple[str, ...] | None:
    """The modules an AdapterHub head file in ``directory`` holds (``classifier``, ``score``,
    ``lm_head``), None without one."""
    from peftjax.tuners._io import stored_weights
    stored, _ = stored_weights(directory, BottleneckConfig())
    heads = {k.rsplit(".", 1)[0] for k in stored
             if ".adapters." not in k and not k.startswith("lm_head.")}
    return tuple(sorted(heads)) or None
