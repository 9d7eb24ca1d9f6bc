"""peftjax: parameter-efficient fine-tuning for JAX / Flax NNX."""

from peftjax import models
from peftjax.generation import Generation, generate
from peftjax.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["Generation", "generate", "load_tokenizer", "models", "__version__"]
