"""bitsandbytes' 4-bit formats (NF4, FP4), bit for bit.

A weight is flattened (row-major, PyTorch layout [out, in]) and cut into blocks of
``blocksize`` values; the last block may be shorter. Each block keeps its float32 absmax; each
value becomes the index of the nearest entry of a 16-value code after scaling by 1/absmax, and
two indices share a byte, the first in the high nibble. Double quantization stores the absmax
values themselves in 8 bits: their mean (``offset``) is subtracted and the rest is quantized in
blocks of 256 with bitsandbytes' signed dynamic 8-bit code.

Every arithmetic step follows bitsandbytes 0.50's reference kernels (the ones it runs on CPU),
so packed bytes, absmax, nested absmax and the offset are the same bits, and dequantization
gives the same floats; ``tests/quant/test_formats.py`` checks that against bitsandbytes.

The offset is PyTorch's float32 mean, whose last bit depends on the order of the summation;
:func:`torch_cpu_mean` reproduces PyTorch's CPU order (see there). Pre-quantized checkpoints
carry their offset, so they load exactly whatever device quantized them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

QUANT_TYPES = ("nf4", "fp4")
# group-wise INT4 (GPTQ's weight format, peftjax.quant._int4): its QuantConfig blocksize is the
# group size
INT4 = "int4"
INT4_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# The NF4 code (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# bitsandbytes' FP4 (1 sign, 2 exponent bits with bias 2, 1 mantissa bit), in bit-pattern order
# (not sorted), normalised by its largest magnitude, 12.
_FP4_UNSCALED = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], np.float32)
FP4_CODE = np.concatenate([_FP4_UNSCALED, -_FP4_UNSCALED]) / np.float32(12)
# bitsandbytes' signed dynamic 8-bit code (``create_dynamic_map()``), as little-endian float32.
# Stored rather than rebuilt because its construction depends on torch.linspace's rounding.
DYNAMIC_CODE = np.frombuffer(bytes.fromhex(
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf"
    "9a9956bf000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf"
    "00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf"
    "666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be"
    "9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbe"
    "cdcc60be666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd"
    "6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd"
    "7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bda3702dbd85eb21bd676616bd48e10abd"
    "52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bccdcc0cbc"
    "819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbb"
    "fca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8"
    "b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
    "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a"
    "9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c"
    "15aee73c52b8fe3c48e10a3d6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d"
    "5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23d"
    "d7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e9a99353e0000443e"
    "6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e"
    "6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003f"
    "cccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f"
    "66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483fcdcc4b3f66664f3f"
    "0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f0000773f"
    "9a997a3f33337e3f0000803f"
), "<f4").copy()

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _bounds(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between neighbours of the sorted code, and the map from sorted to stored index."""
    order = np.argsort(code, kind="stable")
    s = code[order]
    return ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32), order.astype(np.uint8)


def check_format(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: choose one of {QUANT_TYPES}.")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r}: bitsandbytes accepts {BLOCKSIZES}.")


@flax.struct.dataclass(kw_only=True)
class QuantState:
    """How to undo :func:`quantize_4bit`.

    ``absmax``: float32 [blocks], or uint8 [blocks] with double quantization, where the scale of
    block i is ``nested_code[absmax[i]] * nested_absmax[i // 256] + offset``.
    """

    absmax: jax.Array
    nested_absmax: jax.Array | None = None
    offset: jax.Array | None = None
    nested_code: jax.Array | None = None
    shape: tuple = flax.struct.field(pytree_node=False)
    dtype: Any = flax.struct.field(pytree_node=False)
    quant_type: str = flax.struct.field(pytree_node=False, default="nf4")
    blocksize: int = flax.struct.field(pytree_node=False, default=64)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def code(self) -> np.ndarray:
        return CODES[self.quant_type]


def _blockwise_scaled(x: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """``(absmax [blocks], x / absmax per block clamped to [-1, 1])`` in float32, with
    bitsandbytes' rounding: full blocks multiply by the reciprocal, the short last block
    divides."""
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    # bitsandbytes clamps absmax to 1e-38 before dividing. That is subnormal, which XLA flushes
    # to zero (0/0 = nan), so an all-zero block is special-cased: its values scale to 0 either way.
    tiny = np.float32(1e-38)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(blocks * inv[:, None], -1, 1).reshape(-1)
    if full < n:
        am = jnp.max(jnp.abs(flat[full:]))
        rest = jnp.where(am > 0, flat[full:] / jnp.where(am > 0, am, 1.0), 0.0)
        absmax = jnp.concatenate([absmax, jnp.where(am < tiny, tiny, am)[None]])
        scaled = jnp.concatenate([scaled, jnp.clip(rest, -1, 1)])
    return absmax, scaled


def _nearest(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """Index into ``code`` of each value (torch.bucketize over the midpoints: ties go down)."""
    bounds, order = _bounds(code)
    q = jnp.searchsorted(jnp.asarray(bounds), scaled, side="left", method="compare_all")
    return jnp.asarray(order)[q]


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize"))
def _quantize_4bit_jit(x, *, quant_type, blocksize):
    absmax, scaled = _blockwise_scaled(x, blocksize)
    if scaled.shape[0] % 2:
        scaled = jnp.pad(scaled, (0, 1))
    q = _nearest(scaled, CODES[quant_type]).astype(jnp.uint8)
    return (q[::2] << 4) | q[1::2], absmax


@functools.partial(jax.jit, static_argnames=("blocksize",))
def quantize_blockwise(x: jax.Array, *, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantization with bitsandbytes' dynamic code: ``(uint8 codes of x's size,
    float32 absmax [blocks])``. Each value is divided by its block's absmax and takes the
    nearest code entry (ties to the lower one; an all-zero block gives codes 0, as
    bitsandbytes' nan does).

    bitsandbytes' CPU kernel finds the entry with an approximate bucket search that now and
    then takes a farther entry (about 0.2% of values in our tests); those codes then differ by
    one or two, ours being the nearer. The absmax values are identical."""
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    pad = -n % blocksize
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, blocksize)
    if pad:  # the short last block's absmax must not see the padding: pad with its first value
        blocks = blocks.at[-1, blocksize - pad:].set(blocks[-1, 0])
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = (blocks / absmax[:, None]).reshape(-1)[:n]
    q = _nearest(normed, DYNAMIC_CODE)
    return jnp.where(jnp.isnan(normed), 0, q).astype(jnp.uint8), absmax


def dequantize_blockwise(q: jax.Array, absmax: jax.Array, code, *,
                         blocksize: int = NESTED_BLOCKSIZE) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`, float32 of q's size."""
    vals = jnp.asarray(code)[q.reshape(-1).astype(jnp.int32)]
    return vals * jnp.repeat(absmax, blocksize, total_repeat_length=vals.shape[0])


def _ceil_log2(n: int) -> int:
    return 0 if n <= 1 else (n - 1).bit_length()


def _cascade_sum(x: np.ndarray) -> np.ndarray:
    """PyTorch's ``multi_row_sum``: sums axis 0 of x in float32 with four cascade levels."""
    size = x.shape[0]
    power = max(4, _ceil_log2(size) // 4)
    step, mask = 1 << power, (1 << power) - 1
    acc = [np.zeros(x.shape[1:], np.float32) for _ in range(4)]
    blocks = size // step
    if blocks:
        # each block starts from a zeroed level-0 accumulator, so its sum is a running sum
        block_sums = np.cumsum(x[:blocks * step].reshape(blocks, step, *x.shape[1:]), axis=1,
                               dtype=np.float32)[:, -1]
    for b in range(blocks):
        acc[0] = acc[0] + block_sums[b]
        i = (b + 1) * step
        for j in range(1, 4):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = np.zeros_like(acc[j - 1])
            if i & (mask << (j * power)):
                break
    for k in range(blocks * step, size):
        acc[0] = acc[0] + x[k]
    for j in range(1, 4):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(v: np.ndarray) -> np.ndarray:
    """PyTorch's ``row_sum`` over axis 0 with four interleaved accumulators."""
    n = v.shape[0]
    ilp = n // 4
    partial = _cascade_sum(v[:ilp * 4].reshape(ilp, 4, *v.shape[1:]))
    p0 = partial[0]
    for k in range(ilp * 4, n):
        p0 = p0 + v[k]
    for k in range(1, 4):
        p0 = p0 + partial[k]
    return p0


def _torch_cpu_sum(x: np.ndarray, lanes: int) -> np.float32:
    n = x.shape[0]
    if n < lanes:
        return np.float32(_row_sum(x))
    nv = n // lanes
    lane_sums = _row_sum(x[:nv * lanes].reshape(nv, lanes))
    total = np.float32(0)
    for k in range(nv * lanes, n):
        total = np.float32(total + x[k])
    for s in lane_sums:
        total = np.float32(total + s)
    return total


def torch_cpu_mean(x, *, threads: int = 1, lanes: int = 8) -> np.float32:
    """``torch.mean`` of a float32 vector on CPU, to the bit.

    PyTorch sums contiguous float32 on CPU with ``lanes``-wide vectors (8 with AVX2, 16 with
    AVX-512), four interleaved accumulators and a four-level cascade; above 32768 elements each
    of ``threads`` threads sums one contiguous chunk and the chunk sums are added in order.
    bitsandbytes takes the double-quantization offset as this mean, so the defaults reproduce
    a single-threaded AVX2 PyTorch. (On CUDA the order differs again; a checkpoint quantized
    there stores its offset, which loading uses as is.)
    """
    x = np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1))
    n = x.shape[0]
    if n == 0:
        raise ValueError("the mean of an empty vector is undefined")
    grain = 32768
    if threads <= 1 or n < grain:
        total = _torch_cpu_sum(x, lanes)
    else:
        tasks = min(threads, -(-n // grain))
        chunk = -(-n // tasks)
        total = np.float32(0)
        for begin in range(0, n, chunk):
            total = np.float32(total + _torch_cpu_sum(x[begin:begin + chunk], lanes))
    return np.float32(total / np.float32(n))


def quantize_4bit(w, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                  offset_threads: int = 1) -> tuple[jax.Array, QuantState]:
    """Quantizes ``w`` (float32/bf16/f16, any shape) as ``bitsandbytes.functional.quantize_4bit``.

    Returns ``(packed, state)``: ``packed`` uint8 [ceil(w.size / 2)] (bitsandbytes shapes it
    [n, 1]; same bytes). ``double_quant`` is bitsandbytes' ``compress_statistics``;
    ``offset_threads`` the torch thread count to reproduce (see :func:`torch_cpu_mean`).
    Runs jitted on the default device; the offset is computed on the host.
    """
    check_format(quant_type, blocksize)
    dtype = jnp.dtype(w.dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"4-bit quantization takes float32, bfloat16 or float16, not {dtype}.")
    packed, absmax = _quantize_4bit_jit(jnp.asarray(w), quant_type=quant_type, blocksize=blocksize)
    nested = offset = code = None
    if double_quant:
        offset = jnp.asarray(torch_cpu_mean(jax.device_get(absmax), threads=offset_threads))
        absmax, nested = quantize_blockwise(absmax - offset)
        code = jnp.asarray(DYNAMIC_CODE)
    return packed, QuantState(absmax=absmax, nested_absmax=nested, offset=offset,
                              nested_code=code, shape=tuple(w.shape), dtype=dtype,
                              quant_type=quant_type, blocksize=blocksize)


def block_scales(state: QuantState) -> jax.Array:
    """The float32 absmax of every block [blocks] (undoing double quantization)."""
    if not state.double_quant:
        return state.absmax.reshape(-1)
    return dequantize_blockwise(state.absmax, state.nested_absmax, state.nested_code) + state.offset


def dequantize_4bit(packed: jax.Array, state: QuantState, dtype: Any = None) -> jax.Array:
    """The weight back in ``dtype`` (default: the quantized weight's dtype), of ``state.shape``;
    equal to ``bitsandbytes.functional.dequantize_4bit`` (float32 products, then a cast)."""
    n = int(np.prod(state.shape, dtype=np.int64))
    p = packed.reshape(-1)
    q = jnp.stack([p >> 4, p & 0xF], axis=-1).reshape(-1)[:n].astype(jnp.int32)
    vals = jnp.asarray(state.code)[q]
    scales = jnp.repeat(block_scales(state), state.blocksize, total_repeat_length=n)
    return (vals * scales).astype(dtype or state.dtype).reshape(state.shape)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How :func:`peftjax.models.from_pretrained` stores linear layers in 4 bits.

    The names follow transformers' ``BitsAndBytesConfig`` (``bnb_4bit_quant_type``,
    ``bnb_4bit_use_double_quant``, ``bnb_4bit_compute_dtype``, ``llm_int8_skip_modules``).
    ``quant_type``: ``"nf4"`` / ``"fp4"`` (bitsandbytes' formats) or ``"int4"`` (group-wise
    asymmetric INT4, the weight format of GPTQ checkpoints; ``blocksize`` is then the group size
    and there is no double quantization). ``double_quant`` None means True for NF4/FP4.
    ``skip_modules``: layers kept in full precision (a name equal to an entry or ending in
    ``"." + entry``); the output and classification heads by default, as transformers does.
    """

    quant_type: str = "nf4"
    double_quant: bool | None = None
    compute_dtype: Any = "bfloat16"
    blocksize: int = 64
    skip_modules: tuple = ("lm_head", "score", "classifier")
    offset_threads: int = 1

    def __post_init__(self):
        if self.quant_type == INT4:
            if self.blocksize not in INT4_GROUP_SIZES:
                raise ValueError(f"blocksize={self.blocksize!r} (the int4 group size): choose "
                                 f"one of {INT4_GROUP_SIZES}.")
            if self.double_quant:
                raise ValueError("double_quant applies to NF4/FP4; int4 stores float16 scales "
                                 "and zero points per group (leave double_quant unset).")
            object.__setattr__(self, "double_quant", False)
        else:
            if self.quant_type not in QUANT_TYPES:
                raise ValueError(f"quant_type={self.quant_type!r}: choose one of "
                                 f"{QUANT_TYPES + (INT4,)}.")
            check_format(self.quant_type, self.blocksize)
            if self.double_quant is None:
                object.__setattr__(self, "double_quant", True)
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules or ()))
        try:
            dt = jnp.dtype(self.compute_dtype)
        except TypeError as e:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not a dtype; use float32, "
                             "bfloat16 or float16.") from e
        if dt not in (jnp.float32, jnp.bfloat16, jnp.float16):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: use float32, bfloat16 or "
                             "float16.")
        if not isinstance(self.offset_threads, int) or self.offset_threads < 1:
            raise ValueError(f"offset_threads={self.offset_threads!r} must be a positive integer.")
