"""NF4/FP4 storage against bitsandbytes (its CPU kernels), bit for bit."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from peftjax.quant import (DYNAMIC_CODE, FP4_CODE, NF4_CODE, QuantState,  # noqa: E402
                           dequantize_4bit, quantize_4bit, torch_cpu_mean)
from tests.conftest import exact_bitsandbytes  # noqa: E402

F = exact_bitsandbytes()

# bitsandbytes' dequantize is torch.compile'd per shape and dtype; many cases exceed dynamo's
# default recompile limit, after which it silently falls back to eager (same numbers).
torch._dynamo.config.recompile_limit = 10_000

TORCH_TO_JNP = {torch.float32: jnp.float32, torch.bfloat16: jnp.bfloat16,
                torch.float16: jnp.float16}
SHAPES = [(64, 64), (33, 17), (1000,), (3, 7, 64), (5,), (300, 257)]


def _weights(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.001, 3.0)
    x.reshape(-1)[:3] = 0.0  # exact zeros, and (for 5 values) a block that is mostly zero
    return torch.from_numpy(x).to(dtype)


def _ours(x_t):
    return jnp.asarray(x_t.float().numpy()).astype(TORCH_TO_JNP[x_t.dtype])


def test_code_tables_are_bitsandbytes():
    assert np.array_equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(FP4_CODE, F.get_4bit_type("fp4", device="cpu").numpy())
    assert np.array_equal(DYNAMIC_CODE, F.create_dynamic_map().numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_is_bit_identical(quant_type):
    """Packed bytes and float32 absmax equal bitsandbytes for every shape and blocksize in
    float32, and every shape in bfloat16/float16 (the dtype only changes the input's rounding, so
    one blocksize covers it; each case is a compile), two seeds each, including a short last
    block and odd element counts; so does dequantization."""
    cases = [(shape, bs, torch.float32) for shape in SHAPES for bs in [32, 64, 256, 4096]]
    cases += [(shape, 64, dt) for shape in SHAPES for dt in (torch.bfloat16, torch.float16)]
    for (shape, bs, dtype), seed in itertools.product(cases, [0, 1]):
        x = _weights(shape, dtype, seed)
        packed_t, state_t = F.quantize_4bit(x, blocksize=bs, quant_type=quant_type)
        packed, state = quantize_4bit(_ours(x), quant_type=quant_type, blocksize=bs)
        where = f"{quant_type} shape={shape} blocksize={bs} {dtype} seed={seed}"
        assert np.array_equal(np.asarray(packed), packed_t.numpy().reshape(-1)), where
        assert np.array_equal(np.asarray(state.absmax), state_t.absmax.numpy()), where
        deq = np.asarray(dequantize_4bit(packed, state).astype(jnp.float32))
        assert np.array_equal(deq.reshape(-1),
                              F.dequantize_4bit(packed_t, state_t).float().numpy().reshape(-1)), where


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_is_code_times_absmax_in_float64(quant_type):
    """Dequantization from the bytes alone: ``code[nibble] * absmax[flat index // blocksize]``
    computed in float64, for blocks that do and do not divide the rows (the case bitsandbytes'
    AVX512 CPU kernel gets wrong, see ``exact_bitsandbytes``)."""
    code = {"nf4": NF4_CODE, "fp4": FP4_CODE}[quant_type].astype(np.float64)
    for shape, bs in itertools.product([(64, 64), (33, 17), (3, 7, 64), (300, 257)],
                                       [32, 64, 256, 4096]):
        x = jnp.asarray(_weights(shape, torch.float32, 0).numpy())
        packed, state = quantize_4bit(x, quant_type=quant_type, blocksize=bs)
        b = np.asarray(packed).astype(np.uint8)
        nibbles = np.stack([b >> 4, b & 15], 1).reshape(-1)[:x.size]
        want = code[nibbles] * np.repeat(np.asarray(state.absmax, np.float64), bs)[:x.size]
        got = np.asarray(dequantize_4bit(packed, state)).reshape(-1)
        # float32 rounding of one product: half an ulp
        np.testing.assert_allclose(got, want, rtol=2 ** -24, atol=0, err_msg=f"{shape} {bs}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_bitsandbytes(quant_type):
    """Double quantization: the offset (PyTorch's float32 mean, to the bit), nested absmax,
    nested code and packed bytes are identical. The 8-bit absmax codes are identical except
    where bitsandbytes' approximate CPU search took a farther entry (see
    ``quantize_blockwise``): there ours is at most two indexes away and nearer the value."""
    torch.set_num_threads(1)
    total = differ = 0
    for (shape, bs, dtype), seed in itertools.product(
            itertools.product(SHAPES + [(512, 1024)], [32, 64, 4096], list(TORCH_TO_JNP)), [0, 1]):
        x = _weights(shape, dtype, seed)
        packed_t, st = F.quantize_4bit(x, blocksize=bs, quant_type=quant_type,
                                       compress_statistics=True)
        packed, state = quantize_4bit(_ours(x), quant_type=quant_type, blocksize=bs,
                                      double_quant=True)
        where = f"{quant_type} shape={shape} blocksize={bs} {dtype} seed={seed}"
        assert np.array_equal(np.asarray(packed), packed_t.numpy().reshape(-1)), where
        assert np.asarray(state.offset) == st.offset.numpy(), where
        assert np.array_equal(np.asarray(state.nested_absmax), st.state2.absmax.numpy()), where
        assert np.array_equal(np.asarray(state.nested_code), st.state2.code.numpy()), where
        ours, theirs = np.asarray(state.absmax).astype(int), st.absmax.numpy().astype(int)
        bad = np.nonzero(ours != theirs)[0]
        assert np.all(np.abs(ours[bad] - theirs[bad]) <= 2), where
        # the value each code stands for: (absmax - offset) / nested absmax of its 256-block
        _, raw = F.quantize_4bit(x, blocksize=bs, quant_type=quant_type)
        v = ((raw.absmax.numpy() - st.offset.numpy()) /
             np.repeat(st.state2.absmax.numpy(), 256)[:len(ours)])[bad]
        assert np.all(np.abs(v - DYNAMIC_CODE[ours[bad]]) <= np.abs(v - DYNAMIC_CODE[theirs[bad]]))
        total += len(ours)
        differ += len(bad)
    print(f"{quant_type}: {differ} of {total} nested absmax codes differ from bitsandbytes'")
    assert differ / total < 0.01, f"{differ} of {total} nested codes differ"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", list(TORCH_TO_JNP))
def test_dequantizes_bitsandbytes_states_exactly(quant_type, dtype):
    """bitsandbytes' own (packed, state), double-quantized or not, dequantizes to its floats."""
    for dq, shape in itertools.product([False, True], [(96, 128), (33, 17)]):
        x = _weights(shape, dtype, 3)
        packed_t, st = F.quantize_4bit(x, blocksize=64, quant_type=quant_type,
                                       compress_statistics=dq)
        state = QuantState(
            absmax=jnp.asarray(st.absmax.numpy()),
            nested_absmax=jnp.asarray(st.state2.absmax.numpy()) if dq else None,
            offset=jnp.asarray(st.offset.numpy()) if dq else None,
            nested_code=jnp.asarray(st.state2.code.numpy()) if dq else None,
            shape=shape, dtype=TORCH_TO_JNP[dtype], quant_type=quant_type, blocksize=64)
        ours = dequantize_4bit(jnp.asarray(packed_t.numpy()), state)
        assert ours.dtype == TORCH_TO_JNP[dtype]
        want = F.dequantize_4bit(packed_t, st).float().numpy().reshape(shape)
        assert np.array_equal(np.asarray(ours.astype(jnp.float32)), want), (dq, shape)


def test_torch_cpu_mean_is_torch_to_the_bit():
    rng = np.random.default_rng(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n in [1, 5, 8, 17, 100, 513, 4096, 32768, 40000, 65537, 300001]:
            x = rng.random(n, dtype=np.float32) * rng.uniform(0.01, 10)
            assert torch_cpu_mean(x, threads=threads) == torch.from_numpy(x).mean().numpy(), (n, threads)
    torch.set_num_threads(1)


def test_rejects_bad_formats():
    with pytest.raises(ValueError, match="blocksize=48"):
        quantize_4bit(jnp.ones((4, 64)), blocksize=48)
    with pytest.raises(ValueError, match="quant_type='int4'"):
        quantize_4bit(jnp.ones((4, 64)), quant_type="int4")
    with pytest.raises(ValueError, match="int32"):
        quantize_4bit(jnp.ones((4, 64), jnp.int32))
