"""PEFT methods: one file per method, sharing target matching and the PeftModel wrapper."""

from peftjax.tuners._lora import LoraConfig, LoraParam, is_lora_layer
from peftjax.tuners._peft_model import (DEFAULT_LORA_TARGETS, PeftModel, count_parameters,
                                        get_peft_model)
from peftjax.tuners._targets import find_targets, is_target

__all__ = ["DEFAULT_LORA_TARGETS", "LoraConfig", "LoraParam", "PeftModel", "count_parameters",
           "find_targets", "get_peft_model", "is_lora_layer", "is_target"]
