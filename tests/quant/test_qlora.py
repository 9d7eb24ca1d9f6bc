"""QLoRA: 4-bit layers in models (quantize-on-load, bitsandbytes checkpoints from
transformers), LoRA over them, training, merging, memory while loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from peftjax import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftjax.models import from_pretrained, save_pretrained  # noqa: E402
from peftjax.quant import QuantConfig  # noqa: E402
from peftjax.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from peftjax.quant._io import (dequantize_model, has_quantized, merge_and_requantize,  # noqa: E402
                               quantize_model)
from peftjax.quant._linear import QuantizedLinear, QuantWeight  # noqa: E402
from peftjax.train import make_optimizer, make_train_step, split_model  # noqa: E402
from peftjax.train._optim import OptimizerConfig  # noqa: E402
from peftjax.tuners import is_lora_layer  # noqa: E402
from tests.conftest import batch, exact_bitsandbytes  # noqa: E402

exact_bitsandbytes()

F32 = QuantConfig(compute_dtype="float32")
IDS = np.array([[1, 5, 9, 33, 2, 7, 100, 3], [4, 4, 150, 20, 11, 0, 0, 0]])
MASK = (IDS > 0).astype(np.int64)
MASK[1, :5] = 1


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny random Llama (widths multiples of 64, as bitsandbytes' blocksize needs) saved in
    float32 and, through transformers + bitsandbytes, as a 4-bit NF4 + double-quant checkpoint;
    with the PyTorch 4-bit model's logits."""
    import transformers as T
    root = tmp_path_factory.mktemp("qllama")
    cfg = T.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the double-quant offset is torch's mean; see torch_cpu_mean
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.LlamaForCausalLM(cfg).save_pretrained(root / "fp")
        q4 = T.AutoModelForCausalLM.from_pretrained(
            root / "fp", device_map="cpu", dtype=torch.float32,
            quantization_config=T.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32))
        q4.save_pretrained(root / "q4")
        logits = q4(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).logits
    return str(root / "fp"), str(root / "q4"), logits.detach().numpy()[MASK == 1]


def _logits(model):
    """Logits at the real (unpadded) positions."""
    out = np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)).logits)
    return out[MASK == 1]


def test_bitsandbytes_checkpoint_and_quantize_on_load_match_pytorch_4bit(llama_pair):
    fp_dir, q4_dir, want = llama_pair
    pre = from_pretrained(q4_dir, progress=False)
    assert type(pre.model.layers[0].mlp.down_proj) is QuantizedLinear
    assert type(pre.lm_head).__name__ == "Linear"  # transformers keeps the head in float
    err_pre = np.abs(_logits(pre) - want).max()
    ours = from_pretrained(fp_dir, progress=False, quantization=F32)
    err_ours = np.abs(_logits(ours) - want).max()
    print(f"max |logit - PyTorch 4-bit|: bnb checkpoint {err_pre:.2e}, quantize-on-load "
          f"{err_ours:.2e} (logits up to {np.abs(want).max():.2f})")
    assert err_pre < 2e-5 and err_ours < 2e-5
    # the bytes we quantize are the bytes bitsandbytes wrote
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        a = nnx.state(ours.model.layers[1]).to_pure_dict()
        b = nnx.state(pre.model.layers[1]).to_pure_dict()
        for part in name.split("."):
            a, b = a[part], b[part]
        assert np.array_equal(np.asarray(a["packed"]), np.asarray(b["packed"])), name
        assert np.asarray(a["offset"]) == np.asarray(b["offset"]), name
        assert np.array_equal(np.asarray(a["nested_absmax"]), np.asarray(b["nested_absmax"])), name


def test_quantized_sizes_and_errors(llama_pair, tmp_path):
    fp_dir, _, _ = llama_pair
    model = from_pretrained(fp_dir, progress=False, quantization=F32)
    flat = nnx.to_flat_state(nnx.state(model, QuantWeight))
    n_linear = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # q,o + k,v (GQA) + mlp
    packed = sum(v[...].size for p, v in flat if p[-1] == "packed")
    assert packed * 2 == n_linear
    with pytest.raises(ValueError, match="dequantize_model"):
        save_pretrained(model, str(tmp_path / "x"), dtype="bfloat16")
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        QuantizedLinear(96, 64, use_bias=False, axes=("embed", "mlp"), dtype=jnp.float32)
    with pytest.raises(ValueError, match="blocksize=48"):
        QuantConfig(blocksize=48)


@pytest.mark.parametrize("qcfg", [F32, QuantConfig("fp4", double_quant=False, blocksize=32,
                                                  compute_dtype="float32")], ids=["nf4dq", "fp4"])
def test_4bit_checkpoint_loads_in_transformers(llama_pair, tmp_path, qcfg):
    """save_pretrained writes 4-bit layers in transformers' bitsandbytes layout: transformers
    loads the directory as a 4-bit model with our logits, peftjax reads back the same bytes."""
    import transformers as T
    fp_dir, _, _ = llama_pair
    model = from_pretrained(fp_dir, progress=False, quantization=qcfg)
    save_pretrained(model, str(tmp_path / "q"))
    qc = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == qcfg.quant_type and qc["llm_int8_skip_modules"] == ["lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), device_map="cpu",
                                                        dtype=torch.float32)
    q_proj = theirs.model.layers[1].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_state.blocksize == \
        qcfg.blocksize
    with torch.no_grad():
        want = theirs(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).logits.numpy()
    ours = _logits(model)
    print(f"{qcfg.quant_type}: max |ours - transformers loading our 4-bit checkpoint| "
          f"{np.abs(ours - want[MASK == 1]).max():.2e}")
    np.testing.assert_allclose(ours, want[MASK == 1], atol=1e-5)
    again = from_pretrained(str(tmp_path / "q"), progress=False)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, QuantWeight)),
                              nnx.to_flat_state(nnx.state(again, QuantWeight))):
        assert np.array_equal(np.asarray(a[...]), np.asarray(b[...])), p
    # dequantized and saved again, the checkpoint is a plain float one
    save_pretrained(dequantize_model(again), str(tmp_path / "f"))
    assert "quantization_config" not in json.load(open(tmp_path / "f" / "config.json"))


def test_qlora_identity_trains_and_merges(llama_pair, tmp_path):
    fp_dir, _, _ = llama_pair
    float_logits = _logits(from_pretrained(fp_dir, progress=False))
    base = from_pretrained(fp_dir, progress=False, quantization=F32)
    before = _logits(base)
    quant_change = np.abs(before - float_logits).max()  # what 4 bits cost this random model
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                          rngs=nnx.Rngs(0))
    q_proj = peft.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and is_lora_layer(q_proj)
    np.testing.assert_array_equal(_logits(peft), before)  # B = 0: unchanged
    graphdef, trainable, frozen = split_model(peft)
    assert not any(isinstance(v, QuantWeight) for _, v in nnx.to_flat_state(trainable))
    assert any(isinstance(v, QuantWeight) for _, v in nnx.to_flat_state(frozen))
    frozen_bytes = {p: np.asarray(v[...]).copy() for p, v in nnx.to_flat_state(frozen)}
    optimizer = make_optimizer(OptimizerConfig(learning_rate=2e-2))
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer, task="causal_lm")
    ids, mask = batch(lengths=(12, 9, 7, 12))
    data = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "labels": jnp.asarray(np.where(mask == 1, ids, -100))}
    losses = []
    for _ in range(8):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, data, None)
        losses.append(float(metrics["loss"]))
    print("QLoRA losses", [round(x, 3) for x in losses])
    assert losses[-1] < 0.7 * losses[0]
    for p, v in nnx.to_flat_state(frozen):  # 4-bit storage untouched
        np.testing.assert_array_equal(np.asarray(v[...]), frozen_bytes[p])
    nnx.update(peft, trainable)
    trained = _logits(peft)
    assert np.abs(trained - before).max() > 1e-2
    # re-quantizing a merge: the report's error over the adapter's change, recomputed by hand
    _, reports = merge_and_requantize(nnx.clone(peft), F32, progress=False)
    layer = peft.base_model.model.layers[1].mlp.down_proj
    delta = np.asarray(layer.delta_IxO(), np.float32).T
    merged_w = np.asarray(layer.weight_OxI(jnp.float32)) + delta
    packed, state = quantize_4bit(jnp.asarray(merged_w), blocksize=64, double_quant=True)
    err = np.linalg.norm(np.asarray(dequantize_4bit(packed, state)) - merged_w)
    r = reports["model.layers.1.mlp.down_proj"]
    assert r["of_delta"] == pytest.approx(err / np.linalg.norm(delta), rel=1e-4), r
    assert len(reports) == 14 and all(r["of_delta"] > 0 for r in reports.values())
    merged = peft.merge_and_unload()
    assert not any(is_lora_layer(m) for _, m in nnx.iter_graph(merged))
    np.testing.assert_allclose(_logits(merged), trained, atol=2e-5)
    dequantize_model(merged)
    assert not has_quantized(merged)
    np.testing.assert_allclose(_logits(merged), trained, atol=2e-5)
    save_pretrained(merged, str(tmp_path / "merged"))
    reloaded = from_pretrained(str(tmp_path / "merged"), progress=False)
    np.testing.assert_allclose(_logits(reloaded), trained, atol=2e-5)
    # storing the merged weights in 4 bits again costs what the report says
    reports = quantize_model(reloaded, F32, progress=False)
    assert len(reports) == 14 and all(0 < r["rel_fro"] < 0.2 for r in reports.values())
    requant = _logits(reloaded)
    requant_change = np.abs(requant - trained).max()
    print("requantization: max rel. Frobenius error "
          f"{max(r['rel_fro'] for r in reports.values()):.4f}, max logit change "
          f"{requant_change:.4f} (quantizing the float base changed logits by {quant_change:.4f})")
    assert 0 < requant_change < 2 * quant_change


def test_quantize_on_load_never_holds_the_float_model(tmp_path):
    """Host memory while loading with quantization: the 4-bit model plus a few copies of one
    float weight, never the float32 model."""
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2048,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=64)
    largest = 1024 * 2048 * 4  # bytes of the largest float32 weight
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    float_bytes = os.path.getsize(tmp_path / "m" / "model.safetensors")
    # Safetensors files are memory-mapped, and mapped file pages count as resident (they are
    # page cache, evictable). What must stay small is the process's own (anonymous) memory,
    # sampled here every millisecond while the model loads.
    script = textwrap.dedent(f"""
        import json, threading, time
        import jax, jax.numpy as jnp
        from peftjax.models import from_pretrained
        from peftjax.quant import QuantConfig, quantize_4bit
        for shape in [(1024, 1024), (2048, 1024), (1024, 2048)]:  # compile outside the window
            quantize_4bit(jnp.zeros(shape), double_quant=True)
        def anon():
            status = open("/proc/self/status").read()
            return int(status.split("RssAnon:")[1].split()[0]) * 1024
        peak, done = [anon()], []
        start = peak[0]
        def watch():
            while not done:
                peak[0] = max(peak[0], anon())
                time.sleep(0.001)
        t = threading.Thread(target=watch)
        t.start()
        m = from_pretrained({str(tmp_path / "m")!r}, progress=False, quantization=QuantConfig())
        jax.block_until_ready(jax.tree.leaves(m))
        done.append(1)
        t.join()
        print(json.dumps({{"start": start, "peak": peak[0], "end": anon()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew = r["peak"] - r["start"]
    print(f"float32 checkpoint {float_bytes / 2**20:.0f} MiB; anonymous memory grew at most "
          f"{grew / 2**20:.0f} MiB while loading with NF4 and ended "
          f"{(r['end'] - r['start']) / 2**20:.0f} MiB above the start")
    assert grew < 0.6 * float_bytes  # never the float model
    assert r["end"] - r["start"] < 0.4 * float_bytes  # the 4-bit model (+ runtime overhead)
    assert r["peak"] - r["end"] < 6 * largest  # in flight: a few copies of one weight


def test_quantize_on_load_reproduces_a_multithreaded_bitsandbytes_offset(tmp_path):
    """QuantConfig.offset_threads reaches quantize-on-load: above 32768 blocks PyTorch splits
    the double-quant mean across threads, and the offset (hence every absmax code) follows."""
    import bitsandbytes.functional as bnbF
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=4608,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = T.LlamaForCausalLM(cfg)
        ref.save_pretrained(tmp_path / "m")
    w = ref.model.layers[0].mlp.gate_proj.weight.detach()  # 4608 x 256: 36864 blocks of 32
    torch.set_num_threads(2)
    try:
        _, bnb_state = bnbF.quantize_4bit(w, blocksize=32, compress_statistics=True,
                                          quant_type="nf4")
    finally:
        torch.set_num_threads(1)
    offsets = {}
    for threads in (1, 2):
        m = from_pretrained(str(tmp_path / "m"), progress=False,
                            quantization=QuantConfig(blocksize=32, offset_threads=threads))
        offsets[threads] = float(m.model.layers[0].mlp.gate_proj.offset[...])
    assert offsets[1] != offsets[2]  # the thread split changes this mean, so the check can fail
    assert offsets[2] == float(bnb_state.offset)


def test_dora_over_a_4bit_base_matches_peft_with_bitsandbytes(llama_pair, tmp_path):
    """A PEFT DoRA adapter on the bitsandbytes 4-bit model (norms of the dequantized weight)
    loads onto our 4-bit model with PEFT's logits."""
    import peft as torch_peft
    import transformers as T
    _, q4_dir, _ = llama_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q4 = T.AutoModelForCausalLM.from_pretrained(q4_dir, device_map="cpu",
                                                    dtype=torch.float32).eval()
        torch.manual_seed(0)
        pm = torch_peft.get_peft_model(q4, torch_peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True,
            init_lora_weights=False))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        pm.eval().save_pretrained(str(tmp_path))
        want = pm(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).logits
    want = want.detach().numpy()[MASK == 1]
    ours = PeftModel.from_pretrained(from_pretrained(q4_dir, progress=False), str(tmp_path))
    assert type(ours.base_model.model.layers[0].mlp.down_proj).__name__ == "LoraQuantizedLinear"
    diff = np.abs(_logits(ours) - want).max()
    print(f"DoRA over 4-bit: max |logit - PEFT + bitsandbytes| = {diff:.2e}")
    assert diff < 1e-4
