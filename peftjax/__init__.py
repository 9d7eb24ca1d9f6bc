"""peftjax: parameter-efficient fine-tuning for JAX / Flax NNX."""

from peftjax import models, train
from peftjax.generation import Generation, generate
from peftjax.tokenizer import load_tokenizer
from peftjax.tuners import (LoraConfig, PeftModel, PromptTuningConfig, count_parameters,
                            get_peft_model)

__version__ = "0.1.0"

__all__ = ["Generation", "LoraConfig", "PeftModel", "PromptTuningConfig", "count_parameters",
           "generate", "get_peft_model", "load_tokenizer", "models", "train", "__version__"]
