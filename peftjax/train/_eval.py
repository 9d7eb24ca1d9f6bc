"""Evaluating a run's model on a split: loss and accuracy, and for instruction data the
greedy-generation accuracy (the generated text, stripped and lower-cased, starts with the
expected response).

The generation needs no prefill of its own: the loss's forward pass over each example (prompt
and expected response, right-padded) runs with a KV cache, and because a causal model's state
at the prompt's last token does not depend on what follows it, that pass gives the first
generated token (the argmax there) and the prompt's keys and values. Each row's cache index is
then set back to its prompt's end (the expected response's slots are masked out and written
over) and greedy decoding continues from there. One forward pass per example instead of two;
the same tokens as :func:`peftjax.generate` up to float rounding (tested token for token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import RunConfig
from peftjax.data import eval_batches, eval_chunks
from peftjax.generation import _max_positions, continue_tokens
from peftjax.train._losses import causal_lm_loss, lm_head_loss, output_head
from peftjax.train._sharding import shard_batch, to_host
from peftjax.train._step import make_eval_step, summarize


class Evaluator:
    """Loss/accuracy over a split (``examples`` as the data pipeline makes them); with
    ``eval.generation`` on instruction data, also ``generation_accuracy``."""

    def __init__(self, cfg: RunConfig, graphdef, task: str, tokenizer, buckets, mesh):
        self.cfg, self.task, self.tok, self.buckets, self.mesh = cfg, task, tokenizer, buckets, mesh
        self.graphdef = graphdef
        self.generates = (cfg.eval.generation and cfg.data.format == "instruction"
                          and task == "causal_lm")
        if self.generates:
            self.step = scored_generation(graphdef, max_new_tokens=cfg.eval.max_new_tokens)
        else:
            self.step = make_eval_step(graphdef, task=task)

    def __call__(self, examples: list[dict], trainable, frozen) -> dict:
        examples = examples[:self.cfg.eval.max_examples]
        if not examples:
            return {}
        kw = dict(batch_size=self.cfg.eval.batch_size, buckets=self.buckets,
                  pad_id=self.tok.pad_token_id)
        if not self.generates:
            sums = None
            for batch in eval_batches(examples, **kw):
                out = self.step(trainable, frozen, shard_batch(batch, self.mesh))
                sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
            return summarize(sums, task=self.task)
        model = nnx.merge(self.graphdef, trainable, frozen)
        limit = _max_positions(model.config)
        eos = np.atleast_1d(np.asarray(self.tok.eos_token_id if self.tok.eos_token_id is not None
                                       else -1, np.int32))
        pad = np.int32(self.tok.pad_token_id if self.tok.pad_token_id is not None else 0)
        sums, hits = None, 0
        for chunk, batch in eval_chunks(examples, **kw):
            T = batch["input_ids"].shape[1]
            if limit is not None and T + self.cfg.eval.max_new_tokens > limit:
                raise ValueError(f"evaluation: examples of {T} tokens (after padding) + "
                                 f"eval.max_new_tokens={self.cfg.eval.max_new_tokens} exceed "
                                 f"the model's {limit} positions; lower data.max_length or "
                                 "eval.max_new_tokens")
            prompt_len = np.ones(batch["input_ids"].shape[0], np.int32)  # padding rows: 1
            prompt_len[:len(chunk)] = [ex["prompt_len"] for ex in chunk]
            out, tokens, lengths = self.step(trainable, frozen, shard_batch(batch, self.mesh),
                                             prompt_len, eos, pad)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
            tokens, lengths = to_host((tokens, lengths))
            for ex, row, n in zip(chunk, tokens, lengths):
                text = self.tok.decode(row[:n], skip_special_tokens=True)
                hits += text.strip().lower().startswith(ex["response"].strip().lower())
        result = summarize(sums, task=self.task)
        result["generation_accuracy"] = hits / len(examples)
        return result


def scored_generation(graphdef, *, max_new_tokens: int):
    """The jitted ``step(trainable, frozen, batch, prompt_len [B], eos_ids, pad_id)`` ->
    ``(sums, tokens [B, max_new_tokens], lengths [B])``: the causal-LM eval sums of the batch
    (right-padded prompt + response rows, as the eval step takes them) and, for each row, the
    greedy continuation of its first ``prompt_len`` tokens (see the module doc)."""

    def step(trainable, frozen, batch, prompt_len_B, eos_ids, pad_id):
        model = nnx.merge(graphdef, trainable, frozen)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B, T = ids.shape
        S = T + max_new_tokens
        extra = {k: v for k, v in batch.items()
                 if k not in ("input_ids", "attention_mask", "labels")}
        task_ids = extra.get("task_ids")
        cache = (model.init_cache(B, S) if task_ids is None else
                 model.init_cache(B, S, task_ids=task_ids))
        front = cache.index  # slots a method filled in front (a prompt, a prefix)
        head = output_head(model)
        out = model(ids, attention_mask=jnp.pad(mask, ((0, 0), (0, max_new_tokens))),
                    cache=cache, compute_logits=head is None, **extra)
        rows = jnp.arange(B)
        last = prompt_len_B - 1
        if head is not None:
            sums = lm_head_loss(out.hidden_states, head, batch["labels"], mask)
            first = head.logits(out.hidden_states[rows, last])
        else:
            sums = causal_lm_loss(out.logits, batch["labels"], mask)
            first = out.logits[rows, last]
        tok = jnp.argmax(first, axis=-1).astype(jnp.int32)
        # back to each prompt's end: the response's slots are masked and then written over
        cache = out.cache.replace(index=front + prompt_len_B)
        mask_BS = (jnp.arange(S)[None, :] < prompt_len_B[:, None]).astype(jnp.int32)
        tokens, lengths = continue_tokens(model, tok, cache, mask_BS, prompt_len_B, eos_ids,
                                          pad_id, max_new_tokens=max_new_tokens)
        return {"loss_sum": sums[0], "targets": sums[1], "correct": sums[2]}, tokens, lengths

    return jax.jit(step)
