"""LongLoRA (Chen et al. 2024): extending a model's context with LoRA and shifted sparse
attention.

While training, self-attention is S2-Attn (:func:`peftjax.models._attention.s2_attention`):
the sequence is cut into groups of ``group_size_ratio`` of its length, each token attends
within its group, and half of the heads work on the sequence shifted by half a group so
information flows between neighbouring groups; attention scores cost O(T * group) instead of
O(T^2). Evaluation and generation use full attention, as the paper does. The other two parts of
the recipe are settings of the run, not of this procedure:

- position interpolation: ``model.config_overrides: {rope_scaling: {rope_type: linear,
  factor: 2.0}, max_position_embeddings: 16384}`` (linear RoPE scaling to the new length;
  the saved model's ``config.json`` keeps it);
- the paper's "LoRA+": embeddings and normalisation layers train beside LoRA, i.e.
  ``peft.modules_to_save: [embed_tokens, input_layernorm, post_attention_layernorm, norm]``.

Unlike the paper's roll (whose wrapped-around group lets the first tokens attend to the last
ones), the causal and padding mask still applies at the original positions, so no token sees
the future.

YAML::

    procedure: {method: longlora, group_size_ratio: 0.25}
"""

from __future__ import annotations

import dataclasses

from peftjax.models._attention import s2_group_size, shifted_sparse_attention
from peftjax.procedures._base import ProcedureConfig, register_procedure


@register_procedure
@dataclasses.dataclass(frozen=True)
class LongLoraConfig(ProcedureConfig):
    """LongLoRA's S2-Attn while training (see the module doc); ``group_size_ratio``: the
    group size as a fraction of the sequence length (the paper's 1/4)."""

    group_size_ratio: float = 0.25

    method = "longlora"

    def __post_init__(self):
        if not 0.0 < self.group_size_ratio <= 1.0:
            raise ValueError(f"group_size_ratio={self.group_size_ratio!r} must be in (0, 1] "
                             "(the group size as a fraction of the sequence length)")

    def problems(self, run_cfg) -> list[str]:
        p = []
        if run_cfg.peft.method in ("prefix_tuning", "adaption_prompt"):
            p.append(f"LongLoRA's shifted sparse attention does not combine with "
                     f"{run_cfg.peft.method}'s extra keys; use lora (or full)")
        data = run_cfg.data
        lengths = ((data.max_length,) if data.packing else data.buckets) or ()
        for T in lengths:
            try:
                s2_group_size(T, self.group_size_ratio)
            except ValueError as e:
                p.append(f"data length {T}: {e}")
                break
        return p

    def training_context(self):
        return shifted_sparse_attention(self.group_size_ratio)
