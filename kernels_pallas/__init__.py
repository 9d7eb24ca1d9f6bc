"""Pallas kernels for peftjax.

Each op lives in its own module as three parts: a plain-jnp reference, the Pallas kernel (with
``interpret=`` so it runs on CPU in tests), and a ``custom_vjp`` op that picks the kernel on
GPU/TPU. Tests compare kernel to reference. Only ``peftjax.quant`` (and fused LoRA ops) import
this package; models and tuners never do. The first ops arrive with QLoRA (NF4 dequant-matmul).
"""

__all__: list[str] = []
