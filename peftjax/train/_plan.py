"""Planning a run without weights: parameter counts and XLA's memory estimate of the train step.

The model is built abstractly from ``config.json`` alone (``jax.ShapeDtypeStruct`` leaves), the
train step is lowered and compiled for the config's largest batch shape, and the compiled
program's own buffer sizes are reported. It runs on any backend, CPU included; the estimate is
for the backend it runs on (XLA:CPU's scheduler differs from GPU/TPU's, so activations can be
estimated differently there).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.config import RunConfig
from peftjax.train._optim import make_optimizer
from peftjax.train._run import build_model, param_counts, run_task
from peftjax.train._stacking import ScanLayout
from peftjax.train._step import make_train_step, split_model


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def dry_run(cfg: RunConfig, *, compile: bool = True) -> dict:
    """Validates ``cfg`` against the model, counts parameters and (with ``compile``) returns
    XLA's memory analysis of one train step at ``train.batch_size`` x the largest bucket."""
    t0 = time.perf_counter()
    task = run_task(cfg)
    model, heads = build_model(cfg, abstract=True)
    graphdef, trainable, frozen = split_model(model, modules=heads)
    report = {"model": cfg.model.path, "task": task, "method": cfg.peft.method,
              **param_counts(trainable, frozen),
              "frozen_bytes": _nbytes(frozen), "trainable_bytes": _nbytes(trainable)}
    optimizer = make_optimizer(cfg.train.optimizer_config())  # the state layout is what counts
    opt_state = jax.eval_shape(optimizer.init, trainable)
    report["optimizer_bytes"] = _nbytes(opt_state)
    B = cfg.train.batch_size
    T = max(cfg.data.buckets or (cfg.data.max_length,))
    report["batch"] = [B, T]
    if compile:
        i32 = jnp.int32
        labels = (B, T) if task != "sequence_classification" else (B,)
        batch = {"input_ids": jax.ShapeDtypeStruct((B, T), i32),
                 "attention_mask": jax.ShapeDtypeStruct((B, T), i32),
                 "labels": jax.ShapeDtypeStruct(labels, i32)}
        key = jax.eval_shape(lambda: jax.random.key(0)) if cfg.train.dropout else None
        layout = None
        if cfg.train.scan_layers:  # as the run holds them: scanned blocks' weights stacked
            layout = ScanLayout.find(graphdef, trainable, frozen, batch, task=task)
            frozen = layout.stack(frozen)
        step = make_train_step(graphdef, optimizer, task=task, accum_steps=cfg.train.accum_steps,
                               layout=layout)
        t1 = time.perf_counter()
        compiled = step.lower(trainable, opt_state, frozen, batch, key).compile()
        report["compile_seconds"] = round(time.perf_counter() - t1, 1)
        mem = compiled.memory_analysis()
        if mem is not None:
            report.update(argument_bytes=int(mem.argument_size_in_bytes),
                          output_bytes=int(mem.output_size_in_bytes),
                          alias_bytes=int(mem.alias_size_in_bytes),
                          temp_bytes=int(mem.temp_size_in_bytes))
            report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                                     - report["alias_bytes"] + report["temp_bytes"])
        report["backend"] = jax.default_backend()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def memory_plan(cfg: RunConfig) -> dict:
    """Where the train step's device memory goes, from XLA's own buffer sizes for the compiled
    step (no weights are loaded; it runs on CPU): frozen weights, trainable parameters and
    optimizer state are the step's arguments; gradients and activations are in its
    temporaries, of which gradients are counted as the trainable size (at most the
    temporaries: XLA may hold a gradient in the compute dtype, e.g. bf16 for float32 master
    weights, or not all at once) and the rest is activations and other temporaries."""
    r = dry_run(cfg, compile=True)
    if "temp_bytes" not in r:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
    r["gradient_bytes"] = min(r["trainable_bytes"], r["temp_bytes"])
    r["activation_bytes"] = r["temp_bytes"] - r["gradient_bytes"]
    r["batch_bytes"] = max(r["argument_bytes"] - r["frozen_bytes"] - r["trainable_bytes"]
                           - r["optimizer_bytes"], 0)
    return r


def format_memory(r: dict) -> str:
    rows = [("frozen weights", r["frozen_bytes"]), ("trainable parameters", r["trainable_bytes"]),
            ("gradients", r["gradient_bytes"]), ("optimizer state", r["optimizer_bytes"]),
            ("activations + temporaries", r["activation_bytes"]),
            ("batch and other arguments", r["batch_bytes"]),
            ("outputs not aliased to inputs", r["output_bytes"] - r["alias_bytes"])]
    width = max(len(n) for n, _ in rows)
    lines = [f"model {r['model']} ({r['task']}, {r['method']}); {r['total']:,d} parameters, "
             f"{r['trainable']:,d} trainable; batch {r['batch'][0]}x{r['batch'][1]}; XLA "
             f"{r['backend']} compiled in {r['compile_seconds']} s"]
    lines += [f"  {n:<{width}}  {b / 2**30:9.3f} GiB" for n, b in rows]
    lines.append(f"  {'total (XLA)':<{width}}  {r['total_bytes'] / 2**30:9.3f} GiB")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def format_plan(r: dict) -> str:
    lines = [f"model {r['model']} ({r['task']}, {r['method']})",
             f"parameters: {r['total']:,d} total, {r['trainable']:,d} trainable "
             f"({r['trainable_pct']:.4f}%)",
             f"frozen weights {_gib(r['frozen_bytes'])}, trainable {_gib(r['trainable_bytes'])}, "
             f"optimizer state {_gib(r['optimizer_bytes'])}"]
    if "total_bytes" in r:
        lines.append(f"train step at batch {r['batch'][0]}x{r['batch'][1]} on {r['backend']} (XLA "
                     f"memory analysis): arguments {_gib(r['argument_bytes'])}, temporaries "
                     f"(activations, gradients) {_gib(r['temp_bytes'])}, outputs not aliased "
                     f"{_gib(r['output_bytes'] - r['alias_bytes'])}; total {_gib(r['total_bytes'])}"
                     f" (compiled in {r['compile_seconds']} s)")
    lines.append("dry run: config valid, nothing trained")
    return "\n".join(lines)
