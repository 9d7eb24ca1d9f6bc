"""LLaMA-Adapter (Zhang et al. 2023) with PEFT's semantics (``ADAPTION_PROMPT``).

The top ``adapter_layers`` attention layers each get ``adapter_len`` learned prompt vectors
(``adaption_prompt`` [1, adapter_len, hidden], N(0, 1)) and a gate (``adaption_gate`` [1],
zero). The prompt goes through the layer's own frozen key/value projections (no rotary
embedding; a key norm where the family has one); the queries attend to it in a softmax of its
own, scaled by the gate and added to the attention output. The gate starts at zero, so the model
starts exactly as the base model.

PEFT has it for Llama, Mistral and GPT-2; here it works for every decoder family (Llama, Mistral,
Qwen2/3, Gemma 1/2/3, GPT-2), with PEFT's files for all of them. Two details follow PEFT where
its choice is the file format's meaning: on GPT-2 the gated term is added after ``c_proj``,
unprojected; on the other families it is added before ``o_proj`` (PEFT applies ``o_proj`` to it
separately, which counts an ``o_proj`` bias twice on models with ``attention_bias``; here the
model with a zero gate is the base model for them too).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._attention import ExtraKV
from peftjax.tuners._base import PREFIX, TASK_TYPES, AdapterParam, TunerConfig, register
from peftjax.tuners._targets import named_modules

ATTENTION_NAMES = {"gpt2": "attn"}  # PEFT's target_modules per family; decoders: "self_attn"
ENCODERS = ("bert", "roberta")


class AdaptionParam(AdapterParam):
    """LLaMA-Adapter's prompt vectors and gates."""


class AdaptionPrompt(nnx.Module):
    def __init__(self, prompt_1xLxE: jax.Array):
        self.adaption_prompt = AdaptionParam(prompt_1xLxE, axes=(None, None, "embed"))
        self.adaption_gate = AdaptionParam(jnp.zeros((1,), jnp.float32))


@register
@dataclasses.dataclass(frozen=True)
class AdaptionPromptConfig(TunerConfig):
    """LLaMA-Adapter, with the names and meaning of PEFT's ``AdaptionPromptConfig``.

    ``adapter_len``: prompt vectors per adapted layer; ``adapter_layers``: how many layers, from
    the top, get them; ``target_modules``: the attention modules' name (filled from the family).
    """

    adapter_len: int | None = None
    adapter_layers: int | None = None
    target_modules: str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    method = "adaption_prompt"
    peft_type = "ADAPTION_PROMPT"
    merge_reason = ("its prompts pass through a softmax of their own in every adapted layer, "
                    "which no weight change reproduces.")

    def __post_init__(self):
        problems = []
        for name in ("adapter_len", "adapter_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name}={v!r} must be a positive integer (the paper: "
                                "adapter_len=10, adapter_layers=30 of Llama-7B's 32)")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r} must be one of {TASK_TYPES}")
        if problems:
            raise ValueError("invalid AdaptionPromptConfig: " + "; ".join(problems) + ".")

    def resolved(self, model) -> AdaptionPromptConfig:
        kind = model.config.model_type
        if kind in ENCODERS:
            raise ValueError(f"LLaMA-Adapter is defined for decoders; {kind} is an encoder "
                             "(use prefix_tuning or prompt_tuning there).")
        want = ATTENTION_NAMES.get(kind, "self_attn")
        if self.target_modules not in (None, want):
            raise ValueError(f"target_modules={self.target_modules!r}: the attention modules of "
                             f"{kind} are named {want!r}.")
        return dataclasses.replace(self, target_modules=want)

    def adapted(self, model) -> list[tuple[int, str]]:
        """``(layer index, module name)`` of the adapted attention layers, bottom to top."""
        found = sorted((int(n.split(".")[-2]), n) for n, _ in named_modules(model)
                       if n.split(".")[-1] == self.target_modules)
        if self.adapter_layers > len(found):
            raise ValueError(f"adapter_layers={self.adapter_layers} but the model has "
                             f"{len(found)} layers.")
        return found[len(found) - self.adapter_layers:]

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        self.adapted(model)  # refuses more layers than the model has
        E = model.config.hidden_size
        keys = jax.random.split(rngs.params(), self.adapter_layers)
        return {"adaption_prompts": nnx.List([
            AdaptionPrompt(jax.random.normal(k, (1, self.adapter_len, E), jnp.float32))
            for k in keys])}

    def call(self, peft_model, args, kwargs):
        base = peft_model.base_model
        n = base.config.num_layers  # the adapted layers are the top ones (checked at inject)
        extra = [None] * (n - self.adapter_layers) + [
            ExtraKV(prompt=p.adaption_prompt[...], gate=p.adaption_gate[...])
            for p in peft_model.added["adaption_prompts"]]
        return base(*args, extra_kv=extra, **kwargs)

    def peft_entries(self, peft_model) -> dict:
        out = {}
        for (_, name), p in zip(self.adapted(peft_model.base_model),
                                peft_model.added["adaption_prompts"]):
            out[f"{PREFIX}{name}.adaption_prompt"] = (p.adaption_prompt, False)
            out[f"{PREFIX}{name}.adaption_gate"] = (p.adaption_gate, False)
        return out
