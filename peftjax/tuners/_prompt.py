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
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.tuners._base import (TASK_TYPES, AdapterParam, TunerConfig, as_tuple, in_modules,
                                  register)

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


@dataclasses.dataclass(frozen=True)
class PromptLearning(TunerConfig):
    """What the prompt-learning methods (prompt tuning, prefix tuning) share with PEFT
    (``PromptLearningConfig``): the fields below, and a ``SEQ_CLS`` task trains and saves the
    classifier head (PEFT adds ``classifier``/``score`` to ``modules_to_save``), stored under
    ``base_model.<name>``; other ``modules_to_save`` too. The model-shape fields are filled
    from the model."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: Any = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def shared_problems(self) -> list[str]:
        """Checks the shared fields (normalising ``modules_to_save``); a subclass's
        ``__post_init__`` adds its own problems and raises."""
        object.__setattr__(self, "modules_to_save", as_tuple(self.modules_to_save))
        problems = []
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive "
                            "integer")
        if self.num_transformer_submodules not in (None, 1):
            problems.append(f"num_transformer_submodules={self.num_transformer_submodules} "
                            "(encoder-decoder models) is not supported; peftjax models have one")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            problems.append(f"task_type={self.task_type!r} must be one of {TASK_TYPES}")
        return problems

    def _trained_modules(self) -> tuple:
        extra = HEAD_NAMES if self.task_type == "SEQ_CLS" else ()
        return tuple(dict.fromkeys((self.modules_to_save or ()) + extra))

    def trains(self, path, var, peft_model) -> bool:
        return in_modules(path, var, self._trained_modules())

    def head_entries(self, peft_model) -> dict:
        return {"base_model." + key.removeprefix("base_model.model."): entry
                for key, entry in peft_model.trained_base_entries().items()}



def _concrete(x, fallback) -> np.ndarray:
    """``x`` as numpy when its value is known (outside jit), else ``fallback`` (checks of
    values run eagerly; inside jit a gather clamps)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return np.asarray(fallback)


def split_inputs(args: tuple, kwargs: dict):
    """``(input_ids, inputs_embeds)`` of a model call, taken out of ``kwargs``."""
    if len(args) > 1:
        raise TypeError("pass the model inputs other than input_ids by keyword")
    return args[0] if args else kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)


def call_with_front_cache(base, num_front: int, input_ids, embeds, kwargs):
    """Calls ``base`` with a cache whose first ``num_front`` slots a method filled (prompt or
    prefix keys/values, from its ``init_cache``): the caller's mask and positions cover the
    slots after them."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        raise ValueError("pass attention_mask with a cache (1 for the slots holding tokens)")
    kwargs["attention_mask"] = jnp.concatenate(
        [jnp.ones((mask.shape[0], num_front), mask.dtype), mask], axis=1)
    if kwargs.get("positions") is not None:
        kwargs["positions"] = kwargs["positions"] + num_front
    return base(input_ids, inputs_embeds=embeds, **kwargs)


@register
@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(PromptLearning):
    """Prompt tuning, with the names, defaults and meaning of PEFT's ``PromptTuningConfig``.

    ``prompt_tuning_init``: ``"RANDOM"`` (N(0, 1), as ``torch.nn.Embedding``), ``"TEXT"`` (the
    embeddings of ``prompt_tuning_init_text`` tokenized by ``tokenizer_name_or_path``, repeated
    or cut to ``num_virtual_tokens``) or ``"SAMPLE_VOCAB"`` (embeddings of random vocabulary
    tokens). ``token_dim`` and the other model-shape fields are filled from the model.
    """

    num_tasks: int = 1
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    takes_task_ids = True
    merge_reason = ("a soft prompt is extra input tokens, not a change of any weight.")

    def __post_init__(self):
        problems = self.shared_problems()
        if not isinstance(self.num_tasks, int) or self.num_tasks <= 0:
            problems.append(f"num_tasks={self.num_tasks!r} must be a positive integer")
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            problems.append(f"prompt_tuning_init={self.prompt_tuning_init!r} must be one of "
                            f"{PROMPT_TUNING_INITS}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and
                                                      self.tokenizer_name_or_path):
            problems.append("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and "
                            "tokenizer_name_or_path")
        if problems:
            raise ValueError("invalid PromptTuningConfig: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------------ tuner hooks
    def inject(self, model, *, rngs: nnx.Rngs, adapter_name: str = "default") -> dict:
        V = self.num_virtual_tokens * self.num_tasks  # a bank: task t owns rows t*V .. t*V+V-1
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
                n = self.num_virtual_tokens
                ids = (ids * math.ceil(n / len(ids)))[:n] * self.num_tasks
            else:  # SAMPLE_VOCAB
                ids = jax.random.randint(key, (V,), 0, vocab)
            init = embed_ids(model, jnp.asarray(np.asarray(ids), jnp.int32)).astype(jnp.float32)
        # prompts train in float32 over bf16 models (mixed precision), as LoRA factors do
        return {"prompt_encoder": PromptEmbedding(init)}

    def call(self, peft_model, args, kwargs):
        base = peft_model.base_model
        input_ids, embeds = split_inputs(args, kwargs)
        task_ids = kwargs.pop("task_ids", None)
        if kwargs.get("cache") is not None:  # from init_cache: the prompt is in its first slots
            return call_with_front_cache(base, self.num_virtual_tokens, input_ids, embeds, kwargs)
        if (input_ids is None) == (embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if embeds is None:
            embeds = embed_ids(base, input_ids)
        B, T = embeds.shape[:2]
        prompt_BVE = self.prompts(peft_model, B, task_ids)
        V = prompt_BVE.shape[1]
        x = jnp.concatenate([prompt_BVE.astype(embeds.dtype), embeds], axis=1)
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

    def prompts(self, peft_model, batch: int, task_ids=None) -> jax.Array:
        """[B, V, E]: the prompt, or with a bank (``num_tasks > 1``) each row's task's prompt
        (one gather, so a new mix of tasks needs no new compile)."""
        table = peft_model.added["prompt_encoder"].embedding[...]
        V, N = self.num_virtual_tokens, self.num_tasks
        if N == 1:
            if task_ids is not None and np.any(_concrete(task_ids, 0) != 0):
                raise ValueError("task_ids other than 0 given, but the prompt has one task "
                                 "(PromptTuningConfig(num_tasks=N) makes a bank)")
            return jnp.broadcast_to(table, (batch,) + table.shape)
        if task_ids is None:
            raise ValueError(f"this prompt bank holds {N} tasks: pass task_ids [batch] (which "
                             "task's prompt each row uses)")
        task_ids = jnp.asarray(task_ids, jnp.int32)
        if task_ids.shape != (batch,):
            raise ValueError(f"task_ids has shape {task_ids.shape}; expected ({batch},)")
        known = _concrete(task_ids, 0)
        bad = known[(known < 0) | (known >= N)]
        if bad.size:
            raise ValueError(f"task_ids {sorted(set(bad.tolist()))} out of range: the bank holds "
                             f"tasks 0..{N - 1}")
        return table.reshape(N, V, -1)[task_ids]

    def init_cache(self, peft_model, batch: int, max_len: int, dtype=None, task_ids=None):
        """A cache of ``num_virtual_tokens + max_len`` slots whose first slots already hold the
        prompt's keys and values (computed once, here; each row's task's with a bank)."""
        base = peft_model.base_model
        x = self.prompts(peft_model, batch, task_ids)
        V = x.shape[1]
        cache = base.init_cache(batch, V + max_len, dtype)
        mask = jnp.zeros((batch, V + max_len), jnp.int32).at[:, :V].set(1)
        return base(inputs_embeds=x.astype(base.dtype), attention_mask=mask, cache=cache,
                    last_logits_only=True).cache

    def serving_terms(self, peft_model) -> dict:
        return {}  # no linear layer changes: the prompt is all (serving_prompt)

    def serving_prompt(self, peft_model):
        if self.num_tasks != 1:
            raise TypeError(f"a multi-task prompt bank ({self.num_tasks} tasks) is one adapter "
                            "per task when served: save each task's prompt as its own adapter "
                            "and register each.")
        return peft_model.added["prompt_encoder"].embedding[...].astype(jnp.float32)

    def peft_entries(self, peft_model) -> dict:
        return {"prompt_embeddings": (peft_model.added["prompt_encoder"].embedding, False),
                **self.head_entries(peft_model)}

    def to_peft_dict(self) -> dict:
        out = {**super().to_peft_dict(), "num_transformer_submodules": 1}
        if self.num_tasks == 1:  # a single prompt's file is exactly PEFT's
            del out["num_tasks"]
        return out

    @classmethod
    def from_peft_dict(cls, data: dict, path: str) -> PromptTuningConfig:
        data = dict(data)
        # the stored prompt is loaded; the init only matters for new prompts
        if data.get("prompt_tuning_init") == "TEXT" and not data.get("tokenizer_name_or_path"):
            data["prompt_tuning_init"] = "RANDOM"
        return super().from_peft_dict(data, path)

    def for_loading(self) -> PromptTuningConfig:
        return dataclasses.replace(self, prompt_tuning_init="RANDOM")


def prompt_bank(base, directories: list[str]):
    """One model serving several prompt-tuned tasks: the prompts saved in ``directories``
    (PEFT format, trained on the same base model) stacked into a bank, task ``t`` being the
    ``t``-th directory's prompt (a directory holding a bank contributes all its tasks, in
    order). Call the result with ``task_ids`` [B]. The prompts must have the same length and
    task type, and any trained head must be the same in all of them (one model has one head).
    """
    from peftjax.models._safetensors import CheckpointError, SafetensorsFile
    from peftjax.tuners._io import WEIGHTS_FILE, read_config
    from peftjax.tuners._peft_model import get_peft_model

    if len(directories) < 1:
        raise ValueError("prompt_bank needs at least one adapter directory")
    configs = [read_config(d) for d in directories]
    first = configs[0]
    for d, c in zip(directories, configs):
        if not isinstance(c, PromptTuningConfig):
            raise CheckpointError(f"{d}: a {c.peft_type} adapter; a prompt bank stacks "
                                  "PROMPT_TUNING adapters only.")
        if (c.num_virtual_tokens, c.task_type) != (first.num_virtual_tokens, first.task_type):
            raise CheckpointError(
                f"{d}: num_virtual_tokens={c.num_virtual_tokens}, task_type={c.task_type!r}, but "
                f"{directories[0]} has {first.num_virtual_tokens}, {first.task_type!r}; a bank's "
                "prompts must agree.")
    files = [SafetensorsFile(os.path.join(d, WEIGHTS_FILE)) for d in directories]
    heads = {k: np.asarray(files[0][k]) for k in files[0] if k != "prompt_embeddings"}
    for d, f in zip(directories[1:], files[1:]):
        other = {k: np.asarray(f[k]) for k in f if k != "prompt_embeddings"}
        if sorted(other) != sorted(heads) or any(not np.array_equal(other[k], heads[k])
                                                 for k in heads):
            raise CheckpointError(f"{d} trained other weights than {directories[0]} "
                                  f"({sorted(other) or 'none'} vs {sorted(heads) or 'none'}); "
                                  "a bank shares one model, so only prompts may differ.")
    config = dataclasses.replace(first, num_tasks=sum(c.num_tasks for c in configs))
    model = get_peft_model(base, config.for_loading(), rngs=nnx.Rngs(0))
    table = model.added["prompt_encoder"].embedding
    table[...] = jnp.concatenate([jnp.asarray(np.asarray(f["prompt_embeddings"]), jnp.float32)
                                  for f in files], axis=0)
    entries = config.head_entries(model)
    if sorted(entries) != sorted(heads):
        model.unload()
        raise CheckpointError(f"{directories[0]}: stored {sorted(heads)}, the model trains "
                              f"{sorted(entries)}; load the prompts onto the model they were "
                              "trained on.")
    for key, (var, transposed) in entries.items():
        value = heads[key]
        var[...] = jnp.asarray(value.T if transposed else value, var[...].dtype)
    model._set_config(model.active_adapter, config)
    return model
