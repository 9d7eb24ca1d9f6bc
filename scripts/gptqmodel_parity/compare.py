"""peftjax's INT4 / GPTQ checkpoints and QA-LoRA against a real PyTorch GPTQ backend
(GPTQModel 7.0.0 through transformers, its pure-torch ``TorchLinear``) and PyTorch PEFT's
``GPTQLoraLinear`` over it. Not part of the test suite: GPTQModel 7 (the only one PEFT 0.21
accepts) declares transformers >= 5.4 and does not install next to the locked versions without
the patches ``setup_env.sh`` applies. Run from the repository root:

  bash scripts/gptqmodel_parity/setup_env.sh /tmp/gptqenv          # ~2 min, once
  D=/tmp/gptq_parity
  /tmp/gptqenv/bin/python scripts/gptqmodel_parity/compare.py theirs-quantize $D
  .venv/bin/python       scripts/gptqmodel_parity/compare.py ours $D
  /tmp/gptqenv/bin/python scripts/gptqmodel_parity/compare.py theirs-compare $D

``theirs-quantize`` builds a tiny random Llama and quantizes it with GPTQModel's GPTQ (CPU,
asymmetric, groups of 32; GPTQModel writes zero points as they are, ``format: gptq_v2``), and
writes the same file in the v1 convention (``checkpoint_format: gptq``: what transformers reads;
it ignores ``format`` and misreads the v2 file). ``ours`` loads GPTQModel's v2 file in peftjax,
quantizes the float model to INT4 itself and saves it in the GPTQ layout, trains a QA-LoRA
adapter over it and saves that; logits go to ``ours.npz``. ``theirs-compare`` prints the max
logit differences.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings

import numpy as np

warnings.simplefilter("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def theirs_quantize(root: str) -> None:
    import torch
    from optimum.gptq import GPTQQuantizer
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                      max_position_embeddings=128, pad_token_id=0)
    LlamaForCausalLM(cfg).float().save_pretrained(f"{root}/fp")
    data = [{"input_ids": torch.randint(3, 128, (1, 32)),
             "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(8)]
    model = AutoModelForCausalLM.from_pretrained(f"{root}/fp", dtype=torch.float32)
    qz = GPTQQuantizer(bits=4, group_size=32, desc_act=False, sym=False, dataset=data,
                       model_seqlen=32, use_cuda_fp16=False)
    qm = qz.quantize_model(model, tokenizer=None)
    qz.dataset = None
    qm.config.quantization_config["dataset"] = None
    qz.save(qm, f"{root}/gptqmodel_v2")
    # the v1 convention: every zero point nibble minus one
    shutil.copytree(f"{root}/gptqmodel_v2", f"{root}/gptqmodel_v1", dirs_exist_ok=True)
    sd = load_file(f"{root}/gptqmodel_v2/model.safetensors")
    for k in [k for k in sd if k.endswith(".qzeros")]:
        nib = torch.stack([(sd[k] >> (4 * j)) & 15 for j in range(8)], -1)
        nib = (nib - 1) & 15
        out = torch.zeros_like(sd[k])
        for j in range(8):
            out |= nib[..., j] << (4 * j)
        sd[k] = out.contiguous()
    save_file(sd, f"{root}/gptqmodel_v1/model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "quantize_config.json"):
        path = f"{root}/gptqmodel_v1/{name}"
        c = json.load(open(path))
        q = c.get("quantization_config", c)
        q.pop("format", None)
        q["checkpoint_format"] = "gptq"
        json.dump(c, open(path, "w"), indent=1)
    print("quantized with GPTQModel ->", f"{root}/gptqmodel_v2", f"{root}/gptqmodel_v1")


def ours(root: str) -> None:
    import jax.numpy as jnp
    from flax import nnx

    from peftjax import LoraConfig, get_peft_model
    from peftjax.models import from_pretrained, save_pretrained
    from peftjax.quant import QuantConfig
    sys.path.insert(0, os.getcwd())
    from tests.conftest import train_briefly
    x = np.random.RandomState(0).randint(3, 128, (2, 16))
    mask = np.ones_like(x)

    def logits(m):
        return np.asarray(m(jnp.asarray(x), attention_mask=jnp.asarray(mask)).logits)
    out = {"gptqmodel_v2": logits(from_pretrained(f"{root}/gptqmodel_v2", progress=False))}
    model = from_pretrained(f"{root}/fp", progress=False,
                            quantization=QuantConfig("int4", blocksize=32, compute_dtype="float32"))
    save_pretrained(model, f"{root}/peftjax_int4")
    out["peftjax_int4"] = logits(model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                            use_qalora=True, qalora_group_size=32,
                                            init_lora_weights=False), rngs=nnx.Rngs(0))
    train_briefly(peft, "causal_lm", x, mask, steps=2)
    peft.save_pretrained(f"{root}/qalora_adapter")
    out["qalora"] = logits(peft)
    np.savez(f"{root}/ours.npz", x=x, **out)
    print("peftjax logits ->", f"{root}/ours.npz")


def theirs_compare(root: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig
    z = np.load(f"{root}/ours.npz")
    x = torch.tensor(z["x"])

    def load(d):
        return AutoModelForCausalLM.from_pretrained(
            d, device_map="cpu", dtype=torch.float32,
            quantization_config=GPTQConfig(bits=4, backend="torch")).eval()

    def logits(m):
        with torch.no_grad():
            return m(input_ids=x, attention_mask=torch.ones_like(x)).logits.float().numpy()

    def line(what, theirs, key):
        print(f"{what}: max |logit diff| {np.abs(theirs - z[key]).max():.2e} "
              f"(logits up to {np.abs(z[key]).max():.2f})")
    line("GPTQModel's checkpoint: peftjax (v2 file) vs GPTQModel (v1 file)",
         logits(load(f"{root}/gptqmodel_v1")), "gptqmodel_v2")
    base = load(f"{root}/peftjax_int4")
    line("peftjax's INT4 checkpoint: GPTQModel vs peftjax", logits(base), "peftjax_int4")
    pm = PeftModel.from_pretrained(base, f"{root}/qalora_adapter").eval()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    print(f"PEFT wraps q_proj as {type(layer).__name__} over {type(layer.get_base_layer()).__name__}")
    line("peftjax's QA-LoRA adapter: PEFT over GPTQModel vs peftjax", logits(pm), "qalora")
    print(f"(the adapter moves the logits by {np.abs(z['qalora'] - z['peftjax_int4']).max():.2f})")


if __name__ == "__main__":
    step, root = sys.argv[1], sys.argv[2]
    os.makedirs(root, exist_ok=True)
    {"theirs-quantize": theirs_quantize, "ours": ours, "theirs-compare": theirs_compare}[step](root)
