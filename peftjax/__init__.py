"""peftjax: parameter-efficient fine-tuning for JAX / Flax NNX."""

from peftjax import models, train
from peftjax.generation import Generation, generate
from peftjax.models import set_attention_implementation
from peftjax.procedures import LongLoraConfig, ReLoraConfig, SurgicalConfig, rank_layers
from peftjax.tokenizer import load_tokenizer
from peftjax.tuners import (AdaptionPromptConfig, BottleneckConfig, IA3Config, LoraConfig, PeftModel,
                            PrefixTuningConfig, PromptTuningConfig, TiedLoraConfig, VeraConfig,
                            count_parameters, get_peft_model, prompt_bank)

__version__ = "0.1.0"

__all__ = ["AdaptionPromptConfig", "BottleneckConfig", "Generation", "IA3Config", "LoraConfig",
           "LongLoraConfig", "PeftModel", "PrefixTuningConfig", "PromptTuningConfig", "ReLoraConfig",
           "SurgicalConfig", "TiedLoraConfig", "VeraConfig", "count_parameters", "generate",
           "get_peft_model", "load_tokenizer", "models", "prompt_bank", "rank_layers",
           "set_attention_implementation", "train",
           "__version__"]
