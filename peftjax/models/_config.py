"""Reading Hugging Face ``config.json`` files strictly.

Each family reads the keys it implements through :class:`HFConfig`; a value it does not
implement raises :class:`UnsupportedConfigError` naming the key, the value and what is
supported. Keys nobody read and that are not known bookkeeping are reported in one warning, so
a config from a newer transformers release is visible rather than silently misread.
"""

from __future__ import annotations

import warnings
from typing import Any

# Keys that carry no architecture: bookkeeping, generation defaults, training-only settings.
BOOKKEEPING = frozenset({
    "_name_or_path", "architectures", "transformers_version", "model_type", "torch_dtype", "dtype",
    "output_hidden_states", "output_attentions", "return_dict", "use_cache", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "num_labels",
    "max_position_embeddings", "attention_dropout", "pretraining_tp", "tie_word_embeddings",
    "quantization_config", "_attn_implementation_autoset", "cache_implementation",
    "torchscript", "use_return_dict", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "classifier_dropout", "gradient_checkpointing", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "typical_p", "diversity_penalty", "num_beam_groups",
    "encoder_no_repeat_ngram_size", "base_model_tp_plan",
    "base_model_pp_plan", "mlp_only_layers", "unsloth_version", "keys_to_ignore_at_inference",
})


class UnsupportedConfigError(ValueError):
    """A config.json asks for something this implementation does not do."""


class HFConfig:
    """A config dict with strict accessors; call :meth:`finish` once everything is read."""

    def __init__(self, data: dict[str, Any], where: str):
        self.data = dict(data)
        self.where = where
        self._read: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        self._read.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        self._read.add(key)
        if self.data.get(key) is None:
            raise UnsupportedConfigError(f"{self.where}: required key {key!r} is missing.")
        return self.data[key]

    def expect(self, key: str, default: Any, allowed: tuple, why: str = "") -> Any:
        """Reads ``key`` and fails unless its value is one of ``allowed``."""
        value = self.get(key, default)
        if value not in allowed:
            raise UnsupportedConfigError(
                f"{self.where}: {key}={value!r} is not supported; supported: "
                f"{', '.join(repr(a) for a in allowed)}.{(' ' + why) if why else ''}")
        return value

    def num_labels(self, override: int | None) -> int:
        """Classes of a classification head: the override, else ``id2label``, else 2."""
        return override or len(self.get("id2label", {})) or 2

    def classifier_dropout(self, hidden_key: str = "hidden_dropout") -> float:
        """transformers' rule: ``classifier_dropout``, else the hidden dropout, else 0.1."""
        for key in ("classifier_dropout", hidden_key):
            if self.get(key) is not None:
                return float(self.data[key])
        return 0.1

    def unsupported(self, key: str, value: Any, supported: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(f"{self.where}: {key}={value!r} is not supported; {supported}.")

    def finish(self) -> dict[str, Any]:
        """Warns about keys nobody read; returns the config dict (kept for saving)."""
        unknown = sorted(k for k in self.data
                         if k not in self._read and k not in BOOKKEEPING and not k.startswith("_")
                         and not k.endswith(("_token_id", "_token_ids")))
        if unknown:
            warnings.warn(f"{self.where}: ignoring config keys this implementation does not read: "
                          f"{', '.join(unknown)}. If one changes the architecture, outputs will "
                          "differ from the reference.", stacklevel=3)
        return self.data


def rope_parameters(cfg: HFConfig, layer_type: str | None = None,
                    legacy_theta_key: str = "rope_theta", default_theta: float = 10000.0) -> dict:
    """The rope parameters for a layer type, from either config generation.

    transformers 5 writes ``rope_parameters`` (flat, or keyed by layer type); older configs
    write ``rope_theta`` + ``rope_scaling``. Both are accepted.
    """
    params = cfg.get("rope_parameters")
    if params:
        if layer_type is not None and layer_type in params:
            params = params[layer_type]
        elif layer_type is not None and any(isinstance(v, dict) for v in params.values()):
            raise UnsupportedConfigError(f"{cfg.where}: rope_parameters has no entry for layer "
                                         f"type {layer_type!r} (has {sorted(params)}).")
        out = dict(params)
        out.setdefault("rope_theta", cfg.get(legacy_theta_key, default_theta))
        return out
    out = dict(cfg.get("rope_scaling", {}) or {})
    out["rope_theta"] = cfg.get(legacy_theta_key, default_theta)
    return out
