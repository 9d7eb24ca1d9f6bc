"""Group-wise INT4 (GPTQ's weight format), GPTQ checkpoints both ways, and QA-LoRA: PEFT's math
and files, and the merge into the INT4 zero points."""

from __future__ import annotations

import json
import sys
import types
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from peftjax import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftjax.models import CheckpointError, UnsupportedConfigError  # noqa: E402
from peftjax.models import from_pretrained, save_pretrained  # noqa: E402
from peftjax.models._layers import Linear  # noqa: E402
from peftjax.quant import QuantConfig  # noqa: E402
from peftjax.quant._int4 import (Int4Linear, dequantize_int4, quantize_int4,  # noqa: E402
                                 round_zero_points, unpack_nibbles)
from tests.conftest import train_briefly  # noqa: E402

INT4 = QuantConfig("int4", blocksize=32, compute_dtype="float32")
IDS = np.array([[1, 5, 9, 33, 2, 7, 100, 3], [4, 4, 150, 20, 11, 0, 0, 0]])
MASK = (IDS > 0).astype(np.int64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rtn_reference(w: np.ndarray, group: int):
    """GPTQ's asymmetric round-to-nearest grid, written out in numpy float32 per group."""
    out, inp = w.shape
    q = np.zeros_like(w, np.int64)
    scales = np.zeros((out, inp // group), np.float16)
    zeros = np.zeros((out, inp // group))
    for o in range(out):
        for g in range(inp // group):
            x = w[o, g * group:(g + 1) * group].astype(np.float32)
            lo, hi = min(x.min(), np.float32(0)), max(x.max(), np.float32(0))
            if lo == 0 and hi == 0:
                lo, hi = np.float32(-1), np.float32(1)
            s = np.float16((hi - lo) / np.float32(15))
            z = np.clip(np.round(-lo / np.float32(s)), 0, 15)
            q[o, g * group:(g + 1) * group] = np.clip(np.round(x / np.float32(s)) + z, 0, 15)
            scales[o, g], zeros[o, g] = s, z
    return q, scales, zeros


class TorchGPTQLinear(torch.nn.Module):
    """A 4-bit GPTQ layer (``checkpoint_format: gptq``) written from the layout's definition:
    ``qweight`` int32 [in/8, out] with input row 8j+k in bits 4k..4k+3 of word j, ``qzeros``
    int32 [groups, out/8] likewise along outputs and stored minus one, ``scales`` [groups, out],
    ``g_idx`` [in]; W[i, o] = scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])."""

    def __init__(self, tensors: dict, bias=None):
        super().__init__()
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(k, tensors[k])
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.infeatures = self.in_features = tensors["qweight"].shape[0] * 8
        self.outfeatures = self.out_features = tensors["qweight"].shape[1]

    def weight_IxO(self) -> torch.Tensor:
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        q = (self.qweight[:, None, :] >> shifts[None, :, None]) & 15       # [in/8, 8, out]
        q = q.reshape(self.in_features, self.out_features)
        z = (self.qzeros[:, :, None] >> shifts[None, None, :]) & 15        # [G, out/8, 8]
        z = z.reshape(self.qzeros.shape[0], self.out_features) + 1
        g = self.g_idx.long()
        return self.scales.float()[g] * (q.float() - z.float()[g])

    def forward(self, x):
        y = x @ self.weight_IxO()
        return y if self.bias is None else y + self.bias


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random float32 Llama whose linear widths (64, 128) take INT4 groups of 32."""
    import transformers as T
    root = tmp_path_factory.mktemp("int4llama")
    cfg = T.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.LlamaForCausalLM(cfg).save_pretrained(root / "fp")
    return root


def logits(model, ids=IDS, mask=MASK):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)


def torch_gptq_llama(ckpt_dir, fp_dir):
    """transformers' Llama from the float checkpoint with every GPTQ layer of ``ckpt_dir``
    replaced by :class:`TorchGPTQLinear` over its stored tensors."""
    import transformers as T
    from safetensors.torch import load_file
    tensors = load_file(f"{ckpt_dir}/model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    for key in [k for k in tensors if k.endswith(".qweight")]:
        layer = key[:-len(".qweight")]
        parent, child = layer.rsplit(".", 1)
        parts = {s: tensors[f"{layer}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
        setattr(model.get_submodule(parent), child,
                TorchGPTQLinear(parts, tensors.get(f"{layer}.bias")))
    return model


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def close(a, b, atol=1e-4):
    """Logits equal within ``atol`` at the real (unpadded) tokens."""
    keep = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], atol=atol, rtol=0)


# ------------------------------------------------------------------------------- the format
def test_quantize_int4_is_gptqs_round_to_nearest_grid():
    rs = np.random.RandomState(0)
    w = rs.randn(6, 64).astype(np.float32)
    w[1, :32] = 0.0                    # an all-zero group (GPTQ widens it to [-1, 1])
    w[2, 32:] = np.abs(w[2, 32:])       # a group without negatives (zero point 0)
    q, scales, zeros = quantize_int4(jnp.asarray(w), group_size=32)
    rq, rs_, rz = rtn_reference(w, 32)
    np.testing.assert_array_equal(np.asarray(q), rq)
    np.testing.assert_array_equal(np.asarray(scales), rs_)
    np.testing.assert_array_equal(np.asarray(zeros), rz)
    assert rz[2, 1] == 0
    from peftjax.quant._int4 import pack_nibbles
    packed = pack_nibbles(q)
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(packed)), rq)
    w_hat = np.asarray(dequantize_int4(packed, scales, zeros, jnp.arange(64) // 32))
    step = np.repeat(rs_.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(w_hat - w) <= step / 2 + 1e-6)  # rounding error at most half a step


def test_quant_config_int4_checks():
    assert QuantConfig("int4", blocksize=128).double_quant is False
    assert QuantConfig("nf4").double_quant is True
    with pytest.raises(ValueError, match="group size"):
        QuantConfig("int4", blocksize=48)
    with pytest.raises(ValueError, match="double_quant applies to NF4/FP4"):
        QuantConfig("int4", double_quant=True)
    with pytest.raises(ValueError, match="choose one of"):
        QuantConfig("int3")


# ------------------------------------------------------------------------ GPTQ checkpoints
def test_gptq_checkpoint_matches_the_layout_and_round_trips(llama_dir, tmp_path):
    model = from_pretrained(str(llama_dir / "fp"), quantization=INT4, progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    save_pretrained(model, str(tmp_path / "gptq"))
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["sym"] is False and qc["desc_act"] is False and qc["checkpoint_format"] == "gptq"
    # the stored tensors, read by a layer written from the GPTQ layout, give our weights
    ref = torch_gptq_llama(tmp_path / "gptq", llama_dir / "fp")
    for name, ours in [("model.layers.0.self_attn.q_proj", model.model.layers[0].self_attn.q_proj),
                       ("model.layers.1.mlp.down_proj", model.model.layers[1].mlp.down_proj)]:
        np.testing.assert_array_equal(ref.get_submodule(name).weight_IxO().numpy().T,
                                      np.asarray(ours.weight_OxI(jnp.float32)))
    # and the PyTorch model over those layers computes our logits
    close(torch_logits(ref), logits(model))
    again = from_pretrained(str(tmp_path / "gptq"), progress=False)
    np.testing.assert_array_equal(logits(again), logits(model))  # exact: same bits


def test_gptq_checkpoint_with_act_order_and_v2(llama_dir, tmp_path):
    """A checkpoint quantized with ``desc_act`` (g_idx not sorted) loads with each input's own
    group; ``gptq_v2`` stores zero points without the minus one."""
    import shutil

    from safetensors.numpy import load_file, save_file
    model = from_pretrained(str(llama_dir / "fp"), quantization=INT4, progress=False)
    save_pretrained(model, str(tmp_path / "g"))
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    layer = "model.layers.0.mlp.up_proj"
    perm = np.random.RandomState(1).permutation(64)
    q = torch_gptq_llama(tmp_path / "g", llama_dir / "fp").get_submodule(layer)
    # permute the inputs of the stored weight and g_idx: input i now lives where perm sends it
    w_IxO = q.weight_IxO().numpy()
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    codes = ((t[layer + ".qweight"].view(np.uint32)[:, None, :] >> shifts[None, :, None]) & 15)
    codes = codes.reshape(64, -1)[perm]
    t[layer + ".qweight"] = (codes.reshape(8, 8, -1).astype(np.uint32)
                             << shifts[None, :, None]).sum(1).astype(np.uint32).view(np.int32)
    t[layer + ".g_idx"] = t[layer + ".g_idx"][perm]
    save_file(t, str(tmp_path / "g" / "model.safetensors"))
    act = from_pretrained(str(tmp_path / "g"), progress=False)
    got = np.asarray(act.model.layers[0].mlp.up_proj.weight_OxI(jnp.float32)).T
    np.testing.assert_array_equal(got, w_IxO[perm])
    assert not act.model.layers[0].mlp.up_proj.contiguous_groups()
    # gptq_v2: zero points as they are
    shutil.copytree(tmp_path / "g", tmp_path / "v2")
    t = load_file(str(tmp_path / "v2" / "model.safetensors"))
    for k in [k for k in t if k.endswith(".qzeros")]:
        w = t[k].view(np.uint32)
        nib = (w[:, :, None] >> shifts[None, None, :]) & 15
        nib = (nib + 1) & 15
        t[k] = (nib << shifts[None, None, :]).sum(-1).astype(np.uint32).view(np.int32)
    save_file(t, str(tmp_path / "v2" / "model.safetensors"))
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (tmp_path / "v2" / "config.json").write_text(json.dumps(cfg))
    np.testing.assert_array_equal(logits(from_pretrained(str(tmp_path / "v2"), progress=False)),
                                  logits(act))


def test_gptq_bad_checkpoints_are_refused_by_name(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    model = from_pretrained(str(llama_dir / "fp"), quantization=INT4, progress=False)
    save_pretrained(model, str(tmp_path / "g"))
    cfg_path = tmp_path / "g" / "config.json"
    good = cfg_path.read_text()
    for change, match in [({"bits": 8}, "bits=8"), ({"checkpoint_format": "marlin"}, "marlin"),
                          ({"group_size": -1}, "per-channel")]:
        cfg = json.loads(good)
        cfg["quantization_config"].update(change)
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedConfigError, match=match):
            from_pretrained(str(tmp_path / "g"), progress=False)
    cfg_path.write_text(good)
    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.qweight"] = t["model.layers.0.self_attn.q_proj.qweight"][:4]
    save_file(t, str(tmp_path / "g" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj: qweight"):
        from_pretrained(str(tmp_path / "g"), progress=False)


# ------------------------------------------------------------------------------------ QA-LoRA
@pytest.fixture
def fake_gptq_backend(monkeypatch):
    """PEFT applies QA-LoRA only to GPTQModel's layers, and GPTQModel needs a newer torch than
    this project's; PEFT is shown TorchGPTQLinear as GPTQModel's base layer class, so its own
    dispatch, QA-LoRA layer, forward and file loading run unchanged over it."""
    import importlib
    names = ["gptqmodel", "gptqmodel.nn_modules", "gptqmodel.nn_modules.qlinear"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["gptqmodel.nn_modules.qlinear"].BaseQuantLinear = TorchGPTQLinear
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    # the GPTQ dispatcher sees the backend; PEFT's other GPTQModel paths (AWQ, quantization
    # utilities) do not
    for mod, answer in [("peft.tuners.lora.gptq", True), ("peft.tuners.lora.awq", False),
                        ("peft.utils.quantization_utils", False), ("peft.utils.other", False)]:
        monkeypatch.setattr(importlib.import_module(mod), "is_gptqmodel_available",
                            lambda answer=answer: answer)


def test_qalora_matches_peft_both_ways(llama_dir, tmp_path, fake_gptq_backend):
    import peft
    base = from_pretrained(str(llama_dir / "fp"), quantization=INT4, progress=False)
    save_pretrained(base, str(tmp_path / "gptq"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_qalora=True,
                        qalora_group_size=16, init_lora_weights=False)
    ours = get_peft_model(base, config, rngs=nnx.Rngs(1))
    plain = logits(from_pretrained(str(llama_dir / "fp"), quantization=INT4, progress=False))
    train_briefly(ours, "causal_lm", IDS, MASK, steps=2)
    ours.save_pretrained(str(tmp_path / "ad"))
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["use_qalora"] is True and saved["qalora_group_size"] == 16
    # peftjax -> PEFT
    ref = torch_gptq_llama(tmp_path / "gptq", llama_dir / "fp")
    pt = peft.PeftModel.from_pretrained(ref, str(tmp_path / "ad")).eval()
    q_proj = pt.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "GPTQLoraLinear"
    assert tuple(q_proj.lora_A["default"].weight.shape) == (4, 64 // 16)
    want = logits(ours)
    assert np.abs(want - plain).max() > 0.1  # the adapter matters
    close(torch_logits(pt), want)
    # PEFT -> peftjax: PEFT's own QA-LoRA layers with random factors, saved by PEFT
    ref2 = torch_gptq_llama(tmp_path / "gptq", llama_dir / "fp")
    torch.manual_seed(3)
    pt2 = peft.get_peft_model(ref2, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_qalora=True, qalora_group_size=32,
        init_lora_weights=False)).eval()
    pt2.save_pretrained(str(tmp_path / "pt"))
    back = PeftModel.from_pretrained(
        from_pretrained(str(llama_dir / "fp"), quantization=INT4, progress=False),
        str(tmp_path / "pt"))
    close(logits(back), torch_logits(pt2))


def test_qalora_merges_into_int4_zero_points(llama_dir, tmp_path):
    base = from_pretrained(str(llama_dir / "fp"), quantization=INT4, progress=False)
    plain = logits(base)
    peft_model = get_peft_model(base, LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_qalora=True, qalora_group_size=32,
        init_lora_weights=False), rngs=nnx.Rngs(0))
    train_briefly(peft_model, "causal_lm", IDS, MASK, steps=3)
    adapted = logits(peft_model)
    layer = peft_model.base_model.model.layers[0].self_attn.q_proj
    packed = np.asarray(layer.packed[...])
    zeros = np.asarray(layer.zeros[...])
    # in place: the 4-bit codes stay, the zero points move; unmerging moves them back
    layer.merge()
    np.testing.assert_array_equal(np.asarray(layer.packed[...]), packed)
    assert np.abs(np.asarray(layer.zeros[...]) - zeros).max() > 0
    layer.unmerge()
    np.testing.assert_allclose(np.asarray(layer.zeros[...]), zeros, atol=1e-5)
    merged = peft_model.merge_and_unload()
    q = merged.model.layers[1].mlp.down_proj
    assert type(q) is Int4Linear and not q.integer_zeros()
    got = logits(merged)
    change = np.abs(adapted - plain).max()
    err = np.abs(got - adapted).max()
    assert change > 1.0 and err < 1e-4, (change, err)  # measured 7e-6 against a change of ~5
    # saved with its real zero points (peftjax's variant of the GPTQ layout), reloaded exactly
    save_pretrained(merged, str(tmp_path / "m"))
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["peftjax_format"] == "int4_float_zeros" and qc["zero_points"] == "float32"
    assert "quant_method" not in qc
    np.testing.assert_array_equal(logits(from_pretrained(str(tmp_path / "m"), progress=False)),
                                  got)
    import transformers as T
    with pytest.raises(ValueError, match="quant_method"):  # never misread by transformers
        T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    # rounding the zero points makes it a standard GPTQ checkpoint, at a reported cost
    reports = round_zero_points(merged)
    assert len(reports) == 14 and all(r["fro"] > 0 for r in reports.values())
    save_pretrained(merged, str(tmp_path / "r"))
    qc = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq"
    assert np.abs(logits(merged) - adapted).max() > 10 * err


def test_qalora_merge_elsewhere_and_config_errors(llama_dir):
    def adapted(quantization, group):
        base = from_pretrained(str(llama_dir / "fp"), quantization=quantization, progress=False)
        m = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                            use_qalora=True, qalora_group_size=group,
                                            init_lora_weights=False), rngs=nnx.Rngs(0))
        return m, logits(m)
    # float base: merges like LoRA (the change repeated over each group)
    m, before = adapted(None, 16)
    merged = m.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is Linear
    np.testing.assert_allclose(logits(merged), before, atol=1e-4, rtol=0)
    # QA-LoRA groups of 16 inside INT4 groups of 32: not constant per zero point -> dequantized
    m, before = adapted(INT4, 16)
    layer = m.base_model.model.layers[0].self_attn.q_proj
    assert not layer.folds_into_quantized(layer.active)
    with pytest.raises(TypeError, match="only QA-LoRA over INT4"):
        layer.merge()
    merged = m.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is Linear
    np.testing.assert_allclose(logits(merged), before, atol=1e-4, rtol=0)
    # groups of 64 hold two INT4 groups each: exact
    m, before = adapted(INT4, 64)
    merged = m.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is Int4Linear
    np.testing.assert_allclose(logits(merged), before, atol=1e-4, rtol=0)
    base = from_pretrained(str(llama_dir / "fp"), progress=False)
    with pytest.raises(ValueError, match="not a multiple of qalora_group_size=48"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], use_qalora=True,
                                        qalora_group_size=48), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_qalora with use_dora"):
        LoraConfig(use_qalora=True, use_dora=True)
    with pytest.raises(ValueError, match="qalora_group_size=0"):
        LoraConfig(use_qalora=True, qalora_group_size=0)
