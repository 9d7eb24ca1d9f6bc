"""4-bit weights: bitsandbytes' NF4/FP4 formats and the layer that stores them.

``quantize_4bit`` / ``dequantize_4bit`` reproduce bitsandbytes bit for bit; ``QuantizedLinear``
replaces a linear layer with a frozen 4-bit weight (LoRA targets it unchanged);
``QuantConfig`` asks :func:`peftjax.models.from_pretrained` to quantize while loading.
"""

from peftjax.quant._formats import (BLOCKSIZES, CODES, DYNAMIC_CODE, FP4_CODE, NF4_CODE,
                                    QUANT_TYPES, QuantConfig, QuantState, block_scales,
                                    dequantize_4bit, dequantize_blockwise, quantize_4bit,
                                    quantize_blockwise, torch_cpu_mean)

__all__ = [
    "BLOCKSIZES", "CODES", "DYNAMIC_CODE", "FP4_CODE", "NF4_CODE", "QUANT_TYPES", "QuantConfig",
    "QuantState", "block_scales", "dequantize_4bit", "dequantize_blockwise", "quantize_4bit",
    "quantize_blockwise", "torch_cpu_mean",
]
