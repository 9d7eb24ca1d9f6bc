"""Training procedures around the train step (see :mod:`peftjax.procedures._base`): ReLoRA,
LongLoRA and surgical fine-tuning."""

from peftjax.procedures._base import (ProcedureConfig, ProcedureRun, register_procedure,
                                      registered_procedures)
from peftjax.procedures._longlora import LongLoraConfig
from peftjax.procedures._relora import ReLoraConfig, prune_by_magnitude, prune_moments
from peftjax.procedures._surgical import (SurgicalConfig, format_ranking, rank_layers,
                                          transformer_blocks)

__all__ = ["LongLoraConfig", "ProcedureConfig", "ProcedureRun", "ReLoraConfig", "SurgicalConfig",
           "format_ranking", "prune_by_magnitude", "prune_moments", "rank_layers",
           "register_procedure", "registered_procedures", "transformer_blocks"]
