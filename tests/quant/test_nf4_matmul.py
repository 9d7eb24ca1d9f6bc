"""The Pallas 4-bit matmul kernels (interpreted on CPU) against the plain-jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.nf4_matmul import nf4_matmul, nf4_matmul_reference, nf4_matmul_t_reference
from peftjax.quant import FP4_CODE, NF4_CODE


def _weights(n, k, bs, seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(0, 256, (n, k // 2), dtype=np.uint8)),
            jnp.asarray(rng.uniform(0.01, 0.2, (n, k // bs)).astype(np.float32)))


# error relative to the largest |output|. float32: sums in another order (measured 1.8e-6).
# bfloat16: both sides round the output to bfloat16, whose spacing is 2^-8 = 3.9e-3 relative;
# measured 1.7e-3.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 4e-3}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 128, 512])
def test_kernel_matches_reference_forward_and_backward(m, dtype):
    for (n, k, bs, code) in [(96, 128, 64, NF4_CODE), (256, 1024, 64, NF4_CODE),
                             (64, 512, 128, FP4_CODE)]:
        w, s = _weights(n, k, bs, seed=m + n)
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dtype)
        y = nf4_matmul(x, w, s, code=code, blocksize=bs, impl="interpret")
        y_ref = nf4_matmul_reference(x, w, s, code)
        scale = float(jnp.abs(y_ref.astype(jnp.float32)).max())
        err = float(jnp.abs((y - y_ref).astype(jnp.float32)).max()) / scale
        assert y.dtype == dtype and y.shape == (m, n)
        assert err < TOL[dtype], (m, n, k, err)
        dy = jnp.asarray(np.random.default_rng(m + 1).standard_normal((m, n)), dtype)
        _, vjp = jax.vjp(lambda x_: nf4_matmul(x_, w, s, code=code, blocksize=bs,
                                               impl="interpret"), x)
        (dx,) = vjp(dy)
        dx_ref = nf4_matmul_t_reference(dy, w, s, code)
        scale = float(jnp.abs(dx_ref.astype(jnp.float32)).max())
        err = float(jnp.abs((dx - dx_ref).astype(jnp.float32)).max()) / scale
        assert dx.dtype == dtype and err < TOL[dtype], ("dx", m, n, k, err)


def test_gradient_of_xla_path_is_autodiff_of_the_reference():
    w, s = _weights(64, 128, 64, 0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 128)), jnp.float32)
    g = jax.grad(lambda x_: (nf4_matmul(x_, w, s, code=NF4_CODE, blocksize=64) ** 2).sum())(x)
    g_ref = jax.grad(lambda x_: (nf4_matmul_reference(x_, w, s, NF4_CODE) ** 2).sum())(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5)


def test_untileable_shapes_are_rejected_clearly():
    w, s = _weights(60, 128, 64, 0)  # N = 60 is no multiple of 8
    with pytest.raises(ValueError, match="cannot tile"):
        nf4_matmul(jnp.ones((2, 128)), w, s, code=NF4_CODE, blocksize=64, impl="interpret")
