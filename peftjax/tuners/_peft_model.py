"""``get_peft_model`` and ``PeftModel``: a model with adapters, as in Hugging Face PEFT."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from peftjax.models._layers import fold
from peftjax.tuners._lora import LoraConfig, LoraParam, is_lora_layer, lora_class, lora_dropout_rng
from peftjax.tuners._targets import find_targets, get_submodule, named_modules, set_submodule

# PEFT's defaults when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_LORA_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value"),
    "roberta": ("query", "value"),
}


class PeftModel(nnx.Module):
    """The adapted model (``base_model``) and its config. Calling it calls the model.

    The base model is modified in place by :func:`get_peft_model`, as PEFT does.
    """

    def __init__(self, base_model: nnx.Module, peft_config: LoraConfig):
        self.base_model = base_model
        self.peft_config = peft_config

    def __call__(self, *args, dropout_rng=None, **kwargs):
        """Calls the model. ``dropout_rng`` turns on dropout: the model's own and LoRA's."""
        with lora_dropout_rng(fold(dropout_rng, -100)):
            return self.base_model(*args, dropout_rng=dropout_rng, **kwargs)

    @property
    def config(self):
        return self.base_model.config

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return self.base_model.init_cache(batch, max_len, dtype)

    def lora_layers(self):
        return [(n, m) for n, m in named_modules(self.base_model) if is_lora_layer(m)]

    def merge_adapter(self) -> None:
        """Adds each adapter into its base weight (outputs unchanged; inference is faster)."""
        for _, layer in self.lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, dtype=None) -> nnx.Module:
        """Merges the adapters and returns the plain base model (no LoRA layers left).

        An adapted 4-bit layer becomes a float ``Linear`` holding dequantized base + adapter
        (in ``dtype``, default the weight's original dtype), as PEFT does for bitsandbytes
        layers; ``peftjax.quant.quantize_model`` stores it in 4 bits again and reports the
        error that costs. Other 4-bit layers stay 4-bit."""
        for name, layer in self.lora_layers():
            if layer.quantized:
                set_submodule(self.base_model, name, layer.merged_float(dtype))
            else:
                layer.merge()
        return self.unload()

    def unload(self) -> nnx.Module:
        """Removes the LoRA layers without merging and returns the base model: its weights are
        what they were before :func:`get_peft_model` (unless merged before)."""
        for name, layer in self.lora_layers():
            set_submodule(self.base_model, name, layer.unloaded())
        return self.base_model

    def trainable_mask(self) -> nnx.State:
        """Pytree of bools over the model's state: True where a leaf trains.

        LoRA factors always; every parameter of a ``modules_to_save`` module; biases as
        ``bias`` says (``all``: every bias; ``lora_only``: biases of adapted layers).
        """
        cfg = self.peft_config
        save = cfg.modules_to_save or ()
        lora_names = {n for n, _ in self.lora_layers()}

        def trains(path, var) -> bool:
            if isinstance(var, LoraParam):
                return True
            if not isinstance(var, nnx.Param):
                return False
            name = ".".join(map(str, path[:-1]))
            if any(f".{m}." in f".{name}." for m in save):  # the module or anything inside it
                return True
            if path[-1] == "bias":
                return cfg.bias == "all" or (cfg.bias == "lora_only" and name in lora_names)
            return False

        flat = nnx.to_flat_state(nnx.state(self.base_model))
        return nnx.from_flat_state([(p, trains(p, v)) for p, v in flat])

    def save_pretrained(self, directory: str) -> None:
        """Writes the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors),
        which PyTorch ``PeftModel.from_pretrained`` loads."""
        from peftjax.checkpoint import save_adapter
        save_adapter(self, directory)

    @classmethod
    def from_pretrained(cls, base: nnx.Module, directory: str) -> PeftModel:
        """Loads a PEFT-format LoRA adapter (written by peftjax or PyTorch PEFT) onto ``base``."""
        from peftjax.checkpoint import load_adapter
        return load_adapter(base, directory)

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


def count_parameters(model: nnx.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; for a plain model nothing is trainable."""
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, LoraParam))))
    total = sum(int(np.prod(v[...].shape)) for _, v in flat)
    if not isinstance(model, PeftModel):
        return 0, total
    mask = dict(nnx.to_flat_state(model.trainable_mask()))
    trainable = sum(int(np.prod(v[...].shape)) for p, v in flat if mask[p[1:]])
    return trainable, total


def get_peft_model(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> PeftModel:
    """Injects LoRA into ``model`` (in place) and returns it wrapped in a :class:`PeftModel`.

    Right after injection the outputs equal the base model's (B starts at zero, unless
    ``init_lora_weights=False``). Raises ``ValueError`` when the targets match nothing, listing
    the layer names that exist.

    Example::

        model = from_pretrained(path)
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                              rngs=nnx.Rngs(0))
        peft.print_trainable_parameters()
    """
    if isinstance(model, PeftModel):
        raise ValueError("the model already has adapters; call get_peft_model on a plain model")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a LoraConfig, got {type(config).__name__}")
    if config.target_modules is None:
        model_type = model.config.model_type
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ValueError(f"no default target_modules for model_type={model_type!r}; pass "
                             "target_modules explicitly.")
        config = dataclasses.replace(config, target_modules=DEFAULT_LORA_TARGETS[model_type])
    for site, name in enumerate(find_targets(model, config)):
        layer = get_submodule(model, name)
        r, alpha = config.rank_alpha(name)
        new = lora_class(type(layer))(layer, r=r, scaling=config.scaling(r, alpha),
                                      dropout=config.lora_dropout,
                                      init=config.init_lora_weights, site=site, rngs=rngs)
        set_submodule(model, name, new)
    return PeftModel(model, config)

