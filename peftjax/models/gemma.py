"""Gemma 1, 2 and 3 (text): HF config parsing onto the shared decoder.

What makes Gemma differ from Llama, all switches of :class:`DecoderConfig`:
- RMSNorm weights stored as ``scale - 1`` and applied in float32 (``norm_offset=1``);
- token embeddings multiplied by ``sqrt(hidden_size)`` (only for ``input_ids``, not for
  ``inputs_embeds``, as in transformers);
- GeGLU MLP (tanh-approximated GELU gate);
- Gemma 2/3: norms after attention and around the MLP, query scale
  ``query_pre_attn_scalar ** -0.5``, sliding-window layers interleaved with global ones;
- Gemma 2: attention-logit and final-logit soft-capping;
- Gemma 3: q/k RMSNorm, separate rotary tables for local and global layers.
"""

from __future__ import annotations

from peftjax.models import _layers as L
from peftjax.models._config import HFConfig, UnsupportedConfigError, rope_parameters
from peftjax.models._decoder import TASKS, DecoderConfig, common_fields

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


def _layer_types(cfg: HFConfig, model_type: str, n: int) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        if model_type == "gemma":
            return ["full_attention"] * n
        pattern = 2 if model_type == "gemma2" else cfg.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise UnsupportedConfigError(f"{cfg.where}: layer_types must list {n} entries of "
                                     f"'sliding_attention'/'full_attention'; got {types}.")
    return list(types)


def _ropes(cfg: HFConfig, model_type: str, D: int, types: list[str]) -> tuple[L.Rope, ...]:
    if model_type != "gemma3_text":
        rope = L.make_rope(D, rope_parameters(cfg), cfg.where)
        return (rope,) * len(types)
    params = cfg.get("rope_parameters")
    if params and "full_attention" in params:
        full = rope_parameters(cfg, "full_attention", default_theta=1e6)
        local = rope_parameters(cfg, "sliding_attention", default_theta=1e4)
    else:  # legacy: rope_theta/rope_scaling for global layers, rope_local_base_freq for local
        full = rope_parameters(cfg, default_theta=1e6)
        local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 1e4)}
    tables = {"full_attention": L.make_rope(D, full, cfg.where),
              "sliding_attention": L.make_rope(D, local, cfg.where)}
    return tuple(tables[t] for t in types)


def parse_config(data: dict, *, num_labels: int | None = None) -> DecoderConfig:
    model_type = data["model_type"]
    cfg = HFConfig(data, f"config.json (model_type={model_type!r})")
    common = common_fields(cfg, num_labels)
    n, E, D = common["num_layers"], common["hidden_size"], common["head_dim"]
    # Gemma 1 configs say hidden_act="gelu" but the released weights use the tanh approximation
    # (transformers rewrites it the same way).
    act = cfg.get("hidden_activation") or cfg.get("hidden_act", "gelu_pytorch_tanh")
    if act == "gelu":
        act = "gelu_pytorch_tanh"
    if act not in L.ACTIVATIONS:
        raise cfg.unsupported("hidden_activation", act, f"supported: {', '.join(L.ACTIVATIONS)}")
    cfg.expect("use_bidirectional_attention", False, (False,),
               "Only causal (decoder) Gemma checkpoints are implemented.")
    types = _layer_types(cfg, model_type, n)
    window = cfg.get("sliding_window") if model_type != "gemma" else None
    gemma1 = model_type == "gemma"
    return DecoderConfig(
        model_type=model_type,
        **common,
        activation=act,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=model_type == "gemma3_text",
        sandwich_norm=not gemma1,
        norm_offset=1.0,
        embed_scale=E ** 0.5,
        attn_scale=(D if gemma1 else cfg.get("query_pre_attn_scalar", D)) ** -0.5,
        attn_softcap=None if gemma1 else cfg.get("attn_logit_softcapping"),
        final_softcap=None if gemma1 else cfg.get("final_logit_softcapping"),
        layer_windows=tuple(window if t == "sliding_attention" else None for t in types),
        layer_ropes=_ropes(cfg, model_type, D, types),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        hf_config=cfg.finish(),
    )


__all__ = ["MODEL_TYPES", "TASKS", "parse_config"]
