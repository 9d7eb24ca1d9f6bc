"""``get_peft_model`` and ``PeftModel``: a model with an adapter, as in Hugging Face PEFT.

Everything method-specific is a hook of the adapter's config (``peftjax.tuners._base``); this
file only dispatches.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from peftjax.models._loading import hf_param_paths
from peftjax.tuners._base import PREFIX, AdapterParam, TunerConfig
from peftjax.tuners._lora import lora_layers


class PeftModel(nnx.Module):
    """The adapted model (``base_model``), the modules the method adds beside it (a prompt
    encoder), and the config. Calling it calls the model through the method's hook.

    The base model is modified in place by :func:`get_peft_model`, as PEFT does.
    """

    def __init__(self, base_model: nnx.Module, peft_config: TunerConfig,
                 modules: dict[str, nnx.Module] | None = None):
        self.base_model = base_model
        self.peft_config = peft_config
        self.added = nnx.Dict(modules or {})

    def __call__(self, *args, dropout_rng=None, **kwargs):
        """Calls the model. ``dropout_rng`` turns on dropout: the model's own and the adapter's.
        ``task_ids`` [B] picks each row's prompt of a multi-task prompt bank."""
        if not self.peft_config.takes_task_ids:
            self._refuse_task_ids(kwargs.pop("task_ids", None))
        return self.peft_config.call(self, args, {**kwargs, "dropout_rng": dropout_rng})

    def _refuse_task_ids(self, task_ids) -> None:
        if task_ids is not None:
            raise ValueError(f"task_ids select prompts of a multi-task prompt bank "
                             f"(PromptTuningConfig(num_tasks=N)); {self.peft_config.method} has "
                             "no tasks")

    @property
    def config(self):
        return self.base_model.config

    def init_cache(self, batch: int, max_len: int, dtype=None, task_ids=None):
        """A KV cache for ``max_len`` caller tokens (plus whatever the method puts in front;
        ``task_ids`` pick a prompt bank's prompts)."""
        if task_ids is None:
            return self.peft_config.init_cache(self, batch, max_len, dtype)
        if not self.peft_config.takes_task_ids:
            self._refuse_task_ids(task_ids)
        return self.peft_config.init_cache(self, batch, max_len, dtype, task_ids=task_ids)

    def lora_layers(self):
        return lora_layers(self.base_model)

    def merge_adapter(self) -> None:
        """Adds each adapter into its base weight (outputs unchanged; inference is faster)."""
        self._check_mergeable()
        for _, layer in self.lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, dtype=None) -> nnx.Module:
        """Merges the adapter into the weights and returns the plain base model. Methods that
        cannot merge (prompts, prefixes) raise ``TypeError`` naming the reason.

        For LoRA, an adapted 4-bit layer becomes a float ``Linear`` holding dequantized base +
        adapter; ``peftjax.quant.quantize_model`` stores it in 4 bits again and reports the
        error that costs."""
        self._check_mergeable()
        return self.peft_config.merge_and_unload(self, dtype)

    def _check_mergeable(self):
        cfg = self.peft_config
        if not cfg.mergeable:
            raise TypeError(f"{cfg.method} cannot be merged into the weights: {cfg.merge_reason} "
                            "Serve the base model with the adapter instead.")

    def unload(self) -> nnx.Module:
        """Removes the adapter without merging and returns the base model: its weights are what
        they were before :func:`get_peft_model` (unless merged before)."""
        return self.peft_config.unload(self)

    def trainable_mask(self) -> nnx.State:
        """Pytree of bools over this model's state: True where a leaf trains. Every
        :class:`AdapterParam`, and what the method's ``trains`` adds (``modules_to_save``,
        biases)."""
        cfg = self.peft_config

        def trains(path, var) -> bool:
            return isinstance(var, AdapterParam) or cfg.trains(tuple(path), var, self)

        flat = nnx.to_flat_state(nnx.state(self))
        return nnx.from_flat_state([(p, trains(p, v)) for p, v in flat])

    def trained_base_entries(self, rename=lambda owner, key: key) -> dict:
        """PEFT key -> (variable, transposed) for the trained ``nnx.Param``s of the base model
        (``modules_to_save``, biases), under their Hugging Face names; ``rename(owner, key)``
        lets a method move a key to its wrapper level."""
        mask = dict(nnx.to_flat_state(self.trainable_mask()))
        state = dict(nnx.to_flat_state(nnx.state(self.base_model)))
        out = {}
        for key, (path, transposed) in hf_param_paths(self.base_model).items():
            if mask.get(("base_model",) + tuple(path), False):
                out[PREFIX + rename(key.rsplit(".", 1)[0], key)] = (state[path], transposed)
        return out

    def save_pretrained(self, directory: str) -> None:
        """Writes the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors),
        which PyTorch ``PeftModel.from_pretrained`` loads."""
        from peftjax.tuners._io import save_adapter
        save_adapter(self, directory)

    @classmethod
    def from_pretrained(cls, base: nnx.Module, directory: str) -> PeftModel:
        """Loads a PEFT-format adapter (written by peftjax or PyTorch PEFT) onto ``base``; the
        method comes from ``peft_type`` in its adapter_config.json."""
        from peftjax.tuners._io import load_adapter
        return load_adapter(base, directory)

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


def count_parameters(model: nnx.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; for a plain model nothing is trainable."""
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, AdapterParam))))
    total = sum(int(np.prod(v[...].shape)) for _, v in flat)
    if not isinstance(model, PeftModel):
        return 0, total
    mask = dict(nnx.to_flat_state(model.trainable_mask()))
    trainable = sum(int(np.prod(v[...].shape)) for p, v in flat if mask[tuple(p)])
    return trainable, total


def get_peft_model(model: nnx.Module, config: TunerConfig, *, rngs: nnx.Rngs) -> PeftModel:
    """Adds the adapter ``config`` describes to ``model`` (in place; any registered method) and
    returns it wrapped in a :class:`PeftModel`.

    Right after injection the outputs are the method's init behaviour (LoRA: equal to the base
    model's). Raises ``ValueError`` when the targets match nothing, listing the layer names.

    Example::

        model = from_pretrained(path)
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                              rngs=nnx.Rngs(0))
        peft.print_trainable_parameters()
    """
    if isinstance(model, PeftModel):
        raise ValueError("the model already has adapters; call get_peft_model on a plain model")
    if not isinstance(config, TunerConfig):
        raise TypeError(f"expected a PEFT method config (LoraConfig, PromptTuningConfig, ...), "
                        f"got {type(config).__name__}")
    config = config.resolved(model)
    return PeftModel(model, config, config.inject(model, rngs=rngs))
