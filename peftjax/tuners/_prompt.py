"""Soft prompt tuning (Lester et al. 2021) with PEFT's semantics (``PROMPT_TUNING``).

``num_virtual_tokens`` learned embeddings are prepended to the input embeddings; the attention
mask gets ones for them, token types zeros. The outputs the model returns are aligned with the
caller's tokens again (per-token outputs of the virtual positions are dropped), so labels, losses
and the train step are the same as without a prompt. A pooled/sequence output sees the prompt:
an encoder's ``[CLS]`` slot is then the first virtual token, as in PEFT. Causal LM training
differs from PEFT in one label: PEFT's last virtual token predicts the first real token, here
(as without a prompt) nothing does.

The PEFT file holds ``prompt_embeddings`` [num_virtual_tokens, token_dim] and, for classifiers,
the trained head under ``base_model.<name>`` (PEFT adds ``classifier``/``score`` to
``modules_to_save`` for ``task_type="SEQ_CLS"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.tuners._base import TASK_TYPES, AdapterParam, TunerConfig, as_tuple, register

PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
HEAD_NAMES = ("classifier", "score")  # PEFT's cls_layer_names for SEQ_CLS


class PromptParam(AdapterParam):
    """Virtual-token embeddings [num_virtual_tokens, hidden]."""


class PromptEmbedding(nnx.Module):
    """The prompt encoder PEFT calls ``PromptEmbedding``: one table of virtual tokens."""

    def __init__(self, table_VxE: jax.Array):
        self.embedding = PromptParam(table_VxE, axes=(None, "embed"))


def embed_ids(model, input_ids: jax.Array) -> jax.Array:
    """Token embeddings as the model computes them for ``input_ids`` (Gemma's scale included)."""
    backbone = getattr(model, "backbone", model)
    x = backbone.input_embeddings(input_ids)
    scale = getattr(model.config, "embed_scale", None)
    return x * jnp.asarray(scale, x.dtype) if scale is not None else x


@register
@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(TunerConfig):
    """Prompt tuning, with the names, defaults and meaning of PEFT's ``PromptTuningConfig``.

    ``prompt_tuning_init``: ``"RANDOM"`` (N(0, 1), as ``torch.nn.Embedding``), ``"TEXT"`` (the
    embeddings of ``prompt_tuning_init_text`` tokenized by ``tokenizer_name_or_path``, repeated
    or cut to ``num_virtual_tokens``) or ``"SAMPLE_VOCAB"`` (embeddings of random vocabulary
    tokens). ``token_dim`` and the other model-shape fields are filled from the model.
    """

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: Any = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    merge_reason = ("a soft prompt is extra input tokens, not a change of any weight.")

    def __post_init__(self):
        object.__setattr__(self, "modules_to_save", as_tuple(self.modules_to_save))
        problems = []
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive "
                            "integer")
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            problems.append(f"prompt_tuning_init={self.prompt_tuning_init!r} must be one of "
                            f"{PROMPT_TUNING_INITS}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and
                                                      self.tokenizer_name_or_path):
            problems.append("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                            "tokenizer_name_or_path")
        if self.num_transformer_submodules not in (None, 1):
            problems.append(f"num_transformer_submodules={self.num_transformer_submodules} "
                            "(encoder-decoder models) is not supported; peftjax models have one")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r} must be one of {TASK_TYPES}")
        if problems:
            raise ValueError("invalid PromptTuningConfig: " + "; ".join(problems) + ".")

    def _trained_modules(self) -> tuple:
        extra = HEAD_NAMES if self.task_type == "SEQ_CLS" else ()
        return tuple(dict.fromkeys((self.modules_to_save or ()) + extra))

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs) -> dict:
        V = self.num_virtual_tokens
        table = model.backbone.input_embeddings if hasattr(model, "backbone") else None
        table = table if table is not None else model.input_embeddings
        vocab, E = table.embedding[...].shape
        if self.token_dim not in (None, E):
            raise ValueError(f"token_dim={self.token_dim} does not match the model's hidden size "
                             f"{E}")
        key = rngs.params()
        if self.prompt_tuning_init == "RANDOM":
            init = jax.random.normal(key, (V, E), jnp.float32)
        else:
            if self.prompt_tuning_init == "TEXT":
                from peftjax.tokenizer import load_tokenizer
                tok = load_tokenizer(self.tokenizer_name_or_path, **(self.tokenizer_kwargs or {}))
                ids = tok(self.prompt_tuning_init_text)["input_ids"]
                ids = (ids * math.ceil(V / len(ids)))[:V]
            else:  # SAMPLE_VOCAB
                ids = jax.random.randint(key, (V,), 0, vocab)
            init = embed_ids(model, jnp.asarray(np.asarray(ids), jnp.int32)).astype(jnp.float32)
        # prompts train in float32 over bf16 models (mixed precision), as LoRA factors do
        return {"prompt_encoder": PromptEmbedding(init)}

    def call(self, peft_model, args, kwargs):
        base = peft_model.base_model
        if len(args) > 1:
            raise TypeError("pass the model inputs other than input_ids by keyword")
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if kwargs.get("cache") is not None:
            # the cache came from init_cache and holds the prompt in its first V slots: the
            # caller's mask covers the slots after them
            mask = kwargs["attention_mask"]
            V = self.num_virtual_tokens
            kwargs["attention_mask"] = jnp.concatenate(
                [jnp.ones((mask.shape[0], V), mask.dtype), mask], axis=1)
            if kwargs.get("positions") is not None:
                kwargs["positions"] = kwargs["positions"] + V
            return base(input_ids, inputs_embeds=embeds, **kwargs)
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if embeds is None:
            embeds = embed_ids(base, input_ids)
        B, T = embeds.shape[:2]
        prompt_VxE = peft_model.added["prompt_encoder"].embedding[...]
        V = prompt_VxE.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(prompt_VxE.astype(embeds.dtype),
                                              (B,) + prompt_VxE.shape), embeds], axis=1)
        mask = kwargs.pop("attention_mask", None)
        mask = jnp.ones((B, T), jnp.int32) if mask is None else mask
        kwargs["attention_mask"] = jnp.concatenate([jnp.ones((B, V), mask.dtype), mask], axis=1)
        if kwargs.get("positions") is not None:  # the caller's positions start after the prompt
            pos = kwargs["positions"]
            kwargs["positions"] = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(V, dtype=pos.dtype), (B, V)), pos + V], axis=1)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = jnp.concatenate([jnp.zeros((B, V), tt.dtype), tt], axis=1)
        out = base(inputs_embeds=x, **kwargs)
        logits = out.logits
        if logits is not None and logits.ndim == 3:  # per-token logits: drop the prompt's
            logits = logits[:, V:]
        return out.replace(hidden_states=out.hidden_states[:, V:], logits=logits)

    def init_cache(self, peft_model, batch: int, max_len: int, dtype=None):
        """A cache of ``num_virtual_tokens + max_len`` slots whose first slots already hold the
        prompt's keys and values (computed once, here)."""
        base = peft_model.base_model
        prompt_VxE = peft_model.added["prompt_encoder"].embedding[...]
        V = prompt_VxE.shape[0]
        cache = base.init_cache(batch, V + max_len, dtype)
        mask = jnp.zeros((batch, V + max_len), jnp.int32).at[:, :V].set(1)
        x = jnp.broadcast_to(prompt_VxE, (batch,) + prompt_VxE.shape)
        return base(inputs_embeds=x.astype(base.dtype), attention_mask=mask, cache=cache,
                    last_logits_only=True).cache

    def trains(self, path, var, peft_model) -> bool:
        if not isinstance(var, nnx.Param) or path[0] != "base_model":
            return False
        name = ".".join(map(str, path[1:-1]))
        return any(f".{m}." in f".{name}." for m in self._trained_modules())

    def peft_entries(self, peft_model) -> dict:
        out = {"prompt_embeddings": (peft_model.added["prompt_encoder"].embedding, False)}
        for key, entry in peft_model.trained_base_entries().items():
            out["base_model." + key.removeprefix("base_model.model.")] = entry
        return out

    def to_peft_dict(self) -> dict:
        return {**super().to_peft_dict(), "num_transformer_submodules": 1}

    @classmethod
    def from_peft_dict(cls, data: dict, path: str) -> PromptTuningConfig:
        data = dict(data)
        if isinstance(data.get("modules_to_save"), list):  # PEFT appends head names, repeated
            data["modules_to_save"] = list(dict.fromkeys(data["modules_to_save"]))
        # the stored prompt is loaded; the init only matters for new prompts
        if data.get("prompt_tuning_init") == "TEXT" and not data.get("tokenizer_name_or_path"):
            data["prompt_tuning_init"] = "RANDOM"
        return super().from_peft_dict(data, path)

    def for_loading(self) -> PromptTuningConfig:
        return dataclasses.replace(self, prompt_tuning_init="RANDOM")
