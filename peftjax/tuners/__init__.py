"""PEFT methods: one file per method (config, modules, injection, PEFT key mapping, merge),
registered in ``_base`` and driven by the method-agnostic ``PeftModel`` and adapter files."""

from peftjax.tuners._adaption_prompt import AdaptionParam, AdaptionPromptConfig
from peftjax.tuners._base import AdapterParam, ServingTerms, TunerConfig, register, registered
from peftjax.tuners._bottleneck import BottleneckConfig, BottleneckParam
from peftjax.tuners._ia3 import IA3Config, IA3Param
from peftjax.tuners._io import adapter_tensors, load_adapter, read_config, save_adapter
from peftjax.tuners._lora import (
           DEFAULT_LORA_TARGETS,
           LoraConfig,
           LoraParam,
           is_lora_layer,
)
from peftjax.tuners._peft_model import PeftModel, count_parameters, get_peft_model
from peftjax.tuners._prefix import PrefixParam, PrefixTuningConfig
from peftjax.tuners._prompt import PromptParam, PromptTuningConfig, prompt_bank
from peftjax.tuners._targets import find_targets, is_target
from peftjax.tuners._tied_lora import TiedLoraConfig, TiedLoraParam, save_as_lora
from peftjax.tuners._vera import VeraConfig, VeraParam

__all__ = ["AdapterParam", "AdaptionParam", "AdaptionPromptConfig", "BottleneckConfig",
           "BottleneckParam", "DEFAULT_LORA_TARGETS",
           "IA3Config", "IA3Param", "LoraConfig", "LoraParam", "PeftModel", "PrefixParam",
           "PrefixTuningConfig", "PromptParam", "PromptTuningConfig", "ServingTerms", "TiedLoraConfig",
           "TiedLoraParam", "TunerConfig", "VeraConfig", "VeraParam", "adapter_tensors", "count_parameters", "find_targets", "get_peft_model",
           "is_lora_layer", "is_target", "load_adapter", "prompt_bank", "read_config", "register",
           "registered", "save_adapter", "save_as_lora"]
