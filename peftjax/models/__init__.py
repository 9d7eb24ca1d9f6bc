"""Flax NNX transformer models that load and save Hugging Face checkpoints.

Families: Llama 2/3/3.1+, Mistral, Qwen2, Qwen3, Gemma 1/2/3 (decoders); GPT-2; BERT and
RoBERTa (encoders). Tasks: ``causal_lm``, ``sequence_classification``,
``token_classification``, ``features``.
"""

from peftjax.models._attention import (ExtraKV, attention_implementation,
                                       set_attention_implementation)
from peftjax.models._config import UnsupportedConfigError
from peftjax.models._decoder import (DecoderConfig, DecoderForCausalLM,
                                     DecoderForSequenceClassification,
                                     DecoderForTokenClassification, DecoderModel)
from peftjax.models._layers import (Conv1D, Embed, KVCache, LayerNorm, Linear,
                                    ModelOutput, OutputHead, RMSNorm, pool)
from peftjax.models._loading import (FAMILIES, TASK_NAMES, abstract_model, architecture_name,
                                     from_pretrained,
                                     hf_param_paths, save_pretrained, task_of)
from peftjax.models._safetensors import CheckpointError
from peftjax.models.bert import (BertForSequenceClassification, BertForTokenClassification,
                                 BertModel, EncoderConfig)
from peftjax.models.gpt2 import (GPT2Config, GPT2ForSequenceClassification,
                                 GPT2ForTokenClassification, GPT2LMHeadModel, GPT2Model)

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

__all__ = [
    "BertForSequenceClassification", "BertForTokenClassification", "BertModel", "CheckpointError",
    "Conv1D", "DecoderConfig", "DecoderForCausalLM", "DecoderForSequenceClassification",
    "DecoderForTokenClassification", "DecoderModel", "Embed", "EncoderConfig", "ExtraKV",
    "GPT2Config", "GPT2ForSequenceClassification", "GPT2ForTokenClassification",
    "GPT2LMHeadModel", "GPT2Model", "KVCache", "LayerNorm", "Linear", "ModelOutput", "OutputHead",
    "RMSNorm",
    "SUPPORTED_MODEL_TYPES", "TASK_NAMES", "UnsupportedConfigError", "abstract_model",
    "architecture_name", "attention_implementation",
    "from_pretrained", "hf_param_paths", "pool", "save_pretrained", "set_attention_implementation",
    "task_of",
]
