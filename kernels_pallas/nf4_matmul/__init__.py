"""4-bit (NF4/FP4) dequantize-matmul: ``reference`` (plain jnp), ``kernel`` (Pallas, tiled
dequantization), ``op`` (``nf4_matmul``: custom_vjp; the XLA path by default, the Pallas kernels opt-in with
``$PEFTJAX_NF4_IMPL``)."""

from kernels_pallas.nf4_matmul.op import IMPLS, default_impl, nf4_matmul
from kernels_pallas.nf4_matmul.reference import (dequantize_NxK, nf4_matmul_reference,
                                                 nf4_matmul_t_reference)

__all__ = ["IMPLS", "default_impl", "dequantize_NxK", "nf4_matmul", "nf4_matmul_reference",
           "nf4_matmul_t_reference"]
