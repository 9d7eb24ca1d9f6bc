"""Llama 2 / 3 / 3.1+, Mistral, Qwen2 and Qwen3: HF config parsing onto the shared decoder.

Accepted config keys per family are read below; any value outside what is implemented raises
:class:`UnsupportedConfigError` naming it.
"""

from __future__ import annotations

from peftjax.models import _layers as L
from peftjax.models._config import HFConfig, rope_parameters
from peftjax.models._decoder import TASKS, DecoderConfig, common_fields

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _layer_windows(cfg: HFConfig, model_type: str, n: int) -> tuple[int | None, ...]:
    if model_type == "llama":
        return (None,) * n
    window = cfg.get("sliding_window")
    if model_type == "mistral":
        cfg.get("layer_types")
        return (window,) * n
    # Qwen2/3: sliding only when use_sliding_window, on the layers listed as sliding.
    use = cfg.get("use_sliding_window", False)
    types = cfg.get("layer_types")
    max_window_layers = cfg.get("max_window_layers", n)
    if not use or window is None:
        return (None,) * n
    if types is None:
        types = ["sliding_attention" if i >= max_window_layers else "full_attention" for i in range(n)]
    return tuple(window if t == "sliding_attention" else None for t in types)


def parse_config(data: dict, *, num_labels: int | None = None) -> DecoderConfig:
    model_type = data["model_type"]
    cfg = HFConfig(data, f"config.json (model_type={model_type!r})")
    common = common_fields(cfg, num_labels)
    n, D = common["num_layers"], common["head_dim"]
    act = cfg.expect("hidden_act", "silu", tuple(L.ACTIVATIONS))
    if model_type == "llama":
        cfg.expect("pretraining_tp", 1, (1,), "Checkpoints are stored unsplit; set it to 1.")
    bias = bool(cfg.get("attention_bias", False))
    # Qwen2 always has q/k/v biases and never an o_proj bias, whatever attention_bias says.
    qkv_bias, o_bias = (True, False) if model_type == "qwen2" else (bias, bias)
    rope = L.make_rope(D, rope_parameters(cfg), cfg.where)
    return DecoderConfig(
        model_type=model_type,
        **common,
        activation=act,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        attn_scale=D ** -0.5,
        layer_windows=_layer_windows(cfg, model_type, n),
        layer_ropes=(rope,) * n,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hf_config=cfg.finish(),
    )


__all__ = ["MODEL_TYPES", "TASKS", "parse_config"]
