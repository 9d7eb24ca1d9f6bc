"""4-bit weights: bitsandbytes' NF4/FP4 formats, group-wise INT4 (GPTQ's), and the layers
that store them.

``quantize_4bit`` / ``dequantize_4bit`` reproduce bitsandbytes bit for bit; ``QuantizedLinear``
replaces a linear layer with a frozen 4-bit weight (LoRA targets it unchanged), ``Int4Linear``
with a group-wise INT4 one (GPTQ checkpoints; QA-LoRA merges into its zero points);
``QuantConfig`` asks :func:`peftjax.models.from_pretrained` to quantize while loading.
"""

from peftjax.quant._formats import (BLOCKSIZES, CODES, DYNAMIC_CODE, FP4_CODE, NF4_CODE,
                                    QUANT_TYPES, QuantConfig, QuantState, block_scales,
                                    dequantize_4bit, dequantize_blockwise, quantize_4bit,
                                    quantize_blockwise, torch_cpu_mean)
from peftjax.quant._int4 import Int4Linear, dequantize_int4, quantize_int4, round_zero_points
from peftjax.quant._linear import QuantizedLinear

__all__ = [
    "BLOCKSIZES", "CODES", "DYNAMIC_CODE", "FP4_CODE", "NF4_CODE", "QUANT_TYPES", "Int4Linear",
    "QuantConfig", "QuantState", "QuantizedLinear", "block_scales", "dequantize_4bit",
    "dequantize_blockwise", "dequantize_int4", "quantize_4bit", "quantize_blockwise",
    "quantize_int4", "round_zero_points", "torch_cpu_mean",
]
