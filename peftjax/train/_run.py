"""One training run from a :class:`peftjax.config.RunConfig`: data, model, loop, evaluation,
checkpoints, resume, and the files a run leaves in ``output_dir``:

- ``config.yaml``: the validated config; ``metrics.jsonl``: one JSON record per log interval
  and per evaluation; ``summary.json``: the final summary;
- ``checkpoints/<step>/``: orbax checkpoints (trainable, optimizer state, rng, data position);
- ``adapter/`` (LoRA, PEFT format) or ``model/`` (head-only / full fine-tuning, HF format).

Example::

    from peftjax.config import load_config
    summary = run_training(load_config("configs/quickstart.yaml"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from peftjax.checkpoint import RunCheckpointer
from peftjax.config import ConfigError, RunConfig, save_config
from peftjax.data import BatchStream, Splits, load_splits
from peftjax.models import abstract_model, from_pretrained, save_pretrained
from peftjax.quant._linear import STATE_NAMES, QuantizedLinear
from peftjax.tokenizer import load_tokenizer
from peftjax.train._eval import Evaluator
from peftjax.train._optim import make_optimizer, make_schedule
from peftjax.train._sharding import (_env_int, any_process, initialize_distributed, is_primary,
                                     make_mesh, process_rows, replicate_single, shard_batch,
                                     shard_state, to_host, tracing_mesh)
from peftjax.train._stacking import ScanLayout
from peftjax.train._step import make_train_step, set_remat, set_scan_layers, split_model
from peftjax.tuners import PeftModel, get_peft_model
from peftjax.tuners._targets import named_modules


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def run_task(cfg: RunConfig) -> str:
    if cfg.model.task:
        return cfg.model.task
    return "sequence_classification" if cfg.data.format == "classification" else "causal_lm"


def build_model(cfg: RunConfig, *, num_labels: int | None = None, abstract: bool = False,
                progress: bool = True):
    """The model of a run config: loaded (or abstract: shapes only, no weights), with the PEFT
    method applied and the remat policy set. Returns ``(model, head_modules)``, where
    ``head_modules`` is set for ``method: head``."""
    m, task = cfg.model, run_task(cfg)
    kw = dict(task=task, num_labels=m.num_labels or num_labels, dtype=jnp.dtype(m.dtype),
              param_dtype=jnp.dtype(m.param_dtype or m.dtype), revision=m.revision,
              seed=cfg.train.seed, quantization=cfg.quantization.quant_config(),
              config_overrides=m.config_overrides)
    if task not in ("sequence_classification", "token_classification"):
        kw.pop("num_labels")

    def make(model):
        tuner = cfg.peft.tuner_config()
        if tuner is not None:
            if tuner.base_model_name_or_path is None:
                tuner = dataclasses.replace(tuner, base_model_name_or_path=m.path)
            model = get_peft_model(model, tuner, rngs=nnx.Rngs(cfg.train.seed))
        if cfg.train.remat != "none":
            set_remat(model, cfg.train.remat)
        if cfg.train.scan_layers:
            set_scan_layers(model)
        return model

    if abstract:
        model = abstract_model(m.path, **kw, then=make)
    else:
        model = make(from_pretrained(m.path, **kw, progress=progress))
    return model, head_modules(cfg, model)


def prepared(cfg: RunConfig, *, splits: Splits | None = None, tokenizer=None,
             print_fn=print, fresh: bool = False) -> RunConfig:
    """The run config after its procedure's ``prepare`` hook (surgical fine-tuning chooses the
    blocks here). ``splits``/``tokenizer``: the run's data, for a procedure that looks at a few
    batches (None where it must have recorded what it needs, e.g. for eval and export)."""
    procedure = cfg.procedure.procedure_config()

    def load_model(*, abstract: bool):
        plain = dataclasses.replace(
            cfg, peft=dataclasses.replace(cfg.peft, method="full", options={}),
            quantization=dataclasses.replace(cfg.quantization, quant_type=None),
            procedure=type(cfg.procedure)())
        model, _ = build_model(plain, num_labels=splits.num_labels if splits else None,
                               abstract=abstract, progress=False)
        return model

    def batches(n: int):
        stream = BatchStream(splits.train, batch_size=cfg.train.batch_size,
                             buckets=splits.buckets, seed=cfg.data.shuffle_seed,
                             pad_id=tokenizer.pad_token_id,
                             group_by_length=cfg.data.group_by_length)
        return [next(stream) for _ in range(min(n, stream.batches_per_epoch))]

    return procedure.prepare(cfg, load_model=load_model,
                             batches=batches if splits is not None else None, print_fn=print_fn,
                             fresh=fresh)


def head_modules(cfg: RunConfig, model) -> tuple[str, ...] | None:
    """The modules ``method: head`` trains (``peft.head_modules`` or the model's new head)."""
    if cfg.peft.method != "head":
        return None
    heads = cfg.peft.head_modules or tuple(getattr(type(model), "new_head_params", ()))
    if not heads:
        raise ValueError(f"{type(model).__name__} has no head to train alone; set "
                         "peft.head_modules")
    return heads


def param_counts(trainable, frozen) -> dict:
    """Parameter counts; a 4-bit weight counts two parameters per packed byte and its
    quantization state (absmax, ...) counts none."""
    def size(tree):
        total = 0
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
            names = [name for name in names if name != "value"]
            last = names[-1] if names else ""
            if last in STATE_NAMES:
                continue
            total += int(np.prod(x.shape)) * (2 if last == "packed" else 1)
        return total
    n_train, n_frozen = size(trainable), size(frozen)
    return {"trainable": n_train, "total": n_train + n_frozen,
            "trainable_pct": 100.0 * n_train / max(n_train + n_frozen, 1)}


def _quant_note(cfg: RunConfig, model) -> str:
    q = cfg.quantization.quant_config()  # double_quant resolved (None means True for NF4/FP4)
    if q is None:
        return ""
    n = sum(isinstance(m, QuantizedLinear) for _, m in named_modules(model))
    return (f"; {n} linear layers in {q.quant_type}{' + double quant' if q.double_quant else ''}"
            f" (blocksize {q.blocksize}, compute {q.compute_dtype})")


def _peak_memory() -> dict:
    out = {}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    try:
        import resource
        out["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:  # not on Windows
        pass
    return out


class _MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and, when ``tensorboardX`` is installed, writes
    the same scalars for TensorBoard. ``enabled=False`` (processes other than the first in a
    multi-process run) writes nothing."""

    def __init__(self, directory: str, *, enabled: bool = True):
        self.path = os.path.join(directory, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self):
        if self._tb is not None:
            self._tb.close()


@contextlib.contextmanager
def _stop_on_signals():
    """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""
    flag = {"signal": None}

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def save_result(model, directory: str, tokenizer) -> str:
    """Writes what a run produces into ``directory`` with the tokenizer: a ``PeftModel``'s
    adapter (PEFT format) or a plain model's weights (Hugging Face format). Returns
    ``"adapter"`` or ``"model"``."""
    if isinstance(model, PeftModel):
        model.save_pretrained(directory)
    else:
        save_pretrained(model, directory)
    tokenizer.save_pretrained(directory)
    return "adapter" if isinstance(model, PeftModel) else "model"


class _FrozenWeights:
    """The run's frozen weights: per block as ``split_model`` gives them, or, after
    :meth:`hold_stacked` (``train.scan_layers``), the scanned blocks' weights stacked as a
    :class:`ScanLayout` holds them (the per-block arrays freed, so the weights exist once and
    the train step stacks nothing)."""

    def __init__(self, frozen):
        self.value, self.layout = frozen, None

    def hold_stacked(self, layout: ScanLayout) -> None:
        self.value, self.layout = layout.stack(self.value, delete=True), layout

    def per_block(self):
        """The frozen state per block (while stacked: copies, for an evaluation, a
        procedure or the end of the run)."""
        return self.value if self.layout is None else self.layout.unstack(self.value)

    def set(self, frozen) -> None:
        """New per-block frozen weights (a procedure's); held as before."""
        self.value = frozen if self.layout is None else self.layout.stack(frozen, delete=True)

    def hold_per_block(self) -> None:
        """Per block from now on (training is over: the final evaluations and the saved model
        read them without a copy each); the stacked arrays are dropped."""
        self.value, self.layout = self.per_block(), None


def _checkpoint_state(trainable, opt_state, rng, procedure_state: dict) -> dict:
    """What a checkpoint holds: the trainable state, the optimizer state, the rng, and the
    frozen weights a procedure changed (ReLoRA's merged kernels)."""
    state = {"trainable": trainable, "opt_state": opt_state, "rng": rng}
    if procedure_state:
        state["procedure"] = procedure_state
    return state


def _total_steps(cfg: RunConfig, batches_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    return max(1, math.ceil(cfg.train.epochs * batches_per_epoch))


def _better(best: dict | None, result: dict, metric: str, step: int) -> dict | None:
    """The new best ``{"metric", "value", "step"}`` (lower loss, higher anything else)."""
    value = result.get(metric)
    if value is None or (best is not None and (value >= best["value"] if metric == "loss"
                                               else value <= best["value"])):
        return best
    return {"metric": metric, "value": value, "step": step}


def _fmt(result: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())


def run_training(cfg: RunConfig, *, progress: bool = True, print_fn=print,
                 splits: Splits | None = None) -> dict:
    """Trains by ``cfg``; returns (and writes to ``summary.json``) the run summary.

    Resumes from the newest checkpoint in ``output_dir`` when ``train.resume`` is set (and refuses
    to overwrite checkpoints when it is not). SIGINT/SIGTERM save a checkpoint and return with
    ``summary["interrupted"]`` set. A NaN/inf loss raises :class:`TrainingDiverged` without
    saving, so the newest checkpoint is the last good one.

    With ``mesh.distributed`` every process of a multi-process launch calls this with the same
    config: each feeds its rows of every batch, orbax checkpoints are written and restored by
    all, and the first process alone writes the files (metrics, summary, adapter) and prints.
    """
    t_start = time.perf_counter()
    if not cfg.mesh.distributed and (_env_int("JAX_NUM_PROCESSES") or 1) > 1:
        raise ConfigError(f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']} but "
                          "mesh.distributed is false: every process would train alone into "
                          "the same output_dir; set mesh.distributed=true (peftjax launch does)")
    if cfg.mesh.distributed:  # before any JAX call: jax.distributed must come first
        initialize_distributed(init_timeout_s=cfg.mesh.init_timeout_s,
                               heartbeat_timeout_s=cfg.mesh.heartbeat_timeout_s)
    primary = is_primary()
    if not primary:  # one process reports
        print_fn, progress = (lambda *args, **kw: None), False
        with contextlib.suppress(ImportError):
            import datasets
            datasets.disable_progress_bars()
    out_dir = cfg.output_dir
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    has_ckpt = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
    if has_ckpt and not cfg.train.resume:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; set train.resume=true to "
                              "continue that run, or choose another output_dir")
    os.makedirs(out_dir, exist_ok=True)
    task = run_task(cfg)

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, padding_side="left",
                         revision=cfg.model.revision)
    if splits is None:
        splits = load_splits(cfg.data, tok)
    print_fn(f"data: {splits.rows['train']} train / {splits.rows['validation']} validation / "
             f"{splits.rows['test']} test rows -> {len(splits.train)} training examples; "
             f"buckets {list(splits.buckets)}")
    if task == "sequence_classification" and cfg.model.num_labels is None and splits.num_labels:
        # pin the class count the data implies, so the saved config rebuilds the same head
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 num_labels=splits.num_labels))
    if primary:
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    cfg = prepared(cfg, splits=splits, tokenizer=tok, print_fn=print_fn,
                   fresh=not (has_ckpt and cfg.train.resume))
    model, heads = build_model(cfg, num_labels=splits.num_labels, progress=progress)
    mesh = make_mesh(cfg.mesh.mesh_config())
    graphdef, trainable, frozen = split_model(model, modules=heads)
    trainable, frozen = shard_state(trainable, mesh), shard_state(frozen, mesh)
    counts = param_counts(trainable, frozen)
    weights = _FrozenWeights(frozen)
    del frozen  # (held stacked once the first step is compiled, with train.scan_layers)
    print_fn(f"model: {type(model.base_model if isinstance(model, PeftModel) else model).__name__}"
             f" ({cfg.peft.method}); trainable {counts['trainable']:,d} of {counts['total']:,d} "
             f"parameters ({counts['trainable_pct']:.3f}%)" + _quant_note(cfg, model))

    stream = BatchStream(splits.train, batch_size=cfg.train.batch_size, buckets=splits.buckets,
                         seed=cfg.data.shuffle_seed, pad_id=tok.pad_token_id,
                         group_by_length=cfg.data.group_by_length,
                         rows=process_rows(mesh, cfg.train.batch_size))  # this process's share
    total = _total_steps(cfg, stream.batches_per_epoch)
    opt_cfg = cfg.train.optimizer_config(total)
    procedure = cfg.procedure.procedure_config()
    schedule = procedure.schedule(make_schedule(opt_cfg))
    optimizer = make_optimizer(opt_cfg, schedule=schedule,
                               lr_scales=procedure.learning_rate_scales(trainable))
    opt_state = replicate_single(optimizer.init(trainable), mesh)
    base_key = jax.random.key(cfg.train.seed)
    proc = procedure.attach(graphdef, trainable, weights.value,
                            key=jax.random.fold_in(jax.random.key(cfg.train.seed), 2**31 - 1))
    ckpt = RunCheckpointer(ckpt_dir, keep=cfg.train.keep_checkpoints,
                           async_save=cfg.train.async_checkpointing)
    step, best, history = 0, None, {}
    if cfg.train.resume and ckpt.latest_step() is not None:
        step = ckpt.latest_step()
        # restored leaves take the placement of ``like``: the rng on the mesh too
        state, meta = ckpt.restore(step, like=replicate_single(_checkpoint_state(
            trainable, opt_state, jax.random.key_data(base_key),
            proc.saved_state(weights.value)), mesh))
        trainable, opt_state = state["trainable"], state["opt_state"]
        if "procedure" in state:
            weights.value = proc.restored(weights.value, state["procedure"])
        base_key = jax.random.wrap_key_data(state["rng"])
        stream.restore(meta["data"])
        best, history = meta.get("best"), meta.get("history", {})
        print_fn(f"resumed from {ckpt_dir}/{step} (data epoch {stream.position.epoch}, batch "
                 f"{stream.position.index})")

    step_maker = functools.partial(make_train_step, graphdef, optimizer, task=task,
                                   accum_steps=cfg.train.accum_steps,
                                   context=procedure.training_context)
    train_step = step_maker()  # (with train.scan_layers, remade for the layout found below)
    evaluator = Evaluator(cfg, graphdef, task, tok, splits.buckets, mesh)
    log = _MetricsLog(out_dir, enabled=primary)
    compiled, compile_s, step_s = {}, 0.0, 0.0
    metric_name = "accuracy" if task != "causal_lm" else "loss"
    if cfg.eval.generation and cfg.data.format == "instruction":
        metric_name = "generation_accuracy"

    def evaluate(split: str, examples) -> dict:
        t0 = time.perf_counter()
        with tracing_mesh(mesh):
            result = evaluator(examples, trainable, weights.per_block())
        if result:
            result["seconds"] = round(time.perf_counter() - t0, 2)
            log.write({"step": step, "split": split, **result})
            print_fn(f"eval {split} @ step {step}: {_fmt(result)}")
        return result

    saved = {"step": ckpt.latest_step()}

    def save(reason: str) -> None:
        if saved["step"] == step:
            return
        saved["step"] = step
        # (replicated over the mesh: a multi-process checkpoint takes global arrays only)
        ckpt.save(step, replicate_single(_checkpoint_state(
            trainable, opt_state, jax.random.key_data(base_key),
            proc.saved_state(weights.per_block() if proc.changes_frozen else None)), mesh),
                  meta={"data": dataclasses.asdict(stream.position), "best": best,
                        "history": history, "reason": reason})

    if step == 0 and cfg.eval.test_before and splits.test:
        history["test_before"] = evaluate("test_before", splits.test)

    # PEFTJAX_FAULT_SIGKILL_AT=N kills this process with SIGKILL right after step N (and after
    # starting that step's checkpoint save, if any): the tests' crash-and-resume check.
    # (PEFTJAX_FAULT_PROCESS=i: only process i; default all)
    fault_step = int(os.environ.get("PEFTJAX_FAULT_SIGKILL_AT", "-1"))
    if os.environ.get("PEFTJAX_FAULT_PROCESS", str(jax.process_index())) != str(
            jax.process_index()):
        fault_step = -1
    interrupted = None
    # The loop does not wait for each step: a step's metrics stay on the device (pending) and
    # are read back together at the next log step, evaluation, save, procedure boundary or the
    # end, so the host prepares and places the next batch while the device runs this one.
    # Reading them back is where a NaN/inf loss is caught: before anything is saved.
    window = {"loss": 0.0, "acc": 0.0, "n": 0, "tokens": 0, "t": 0.0, "grad_norm": None}
    pending, clock = [], {"start": None, "excluded": 0.0}

    def flush() -> None:
        """Waits for the pending steps, checks their losses and adds them to the window."""
        nonlocal step_s
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        elapsed = time.perf_counter() - clock["start"] - clock["excluded"]
        clock["start"], clock["excluded"] = None, 0.0
        window["t"] += elapsed
        step_s += elapsed
        for (at, _), m in zip(pending, values):
            loss = float(m["loss"])
            if not math.isfinite(loss):
                kept = ckpt.latest_step()
                raise TrainingDiverged(
                    f"the loss became {loss} at step {at} (grad norm "
                    f"{float(m['grad_norm']):.3g}); nothing was saved for it. The last good "
                    f"checkpoint is {f'{ckpt_dir}/{kept}' if kept is not None else 'none'}. "
                    "Lower train.lr, raise warmup_steps, or keep max_grad_norm set.")
            window["loss"] += loss
            window["acc"] += float(m["accuracy"])
            window["n"] += 1
            window["grad_norm"] = float(m["grad_norm"])
        pending.clear()

    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", unit="step",
               dynamic_ncols=True)
    note = bar.write if primary else (lambda *args, **kw: None)
    try:
        with _stop_on_signals() as stop:
            while step < total:
                if clock["start"] is None:
                    clock["start"] = time.perf_counter()
                host_batch = next(stream)
                batch = shard_batch(host_batch, mesh, global_rows=cfg.train.batch_size)
                key = jax.random.fold_in(base_key, step) if cfg.train.dropout else None
                length = batch["input_ids"].shape[1]
                if length not in compiled:
                    t0 = time.perf_counter()
                    with tracing_mesh(mesh):
                        if cfg.train.scan_layers and weights.layout is None:
                            weights.hold_stacked(ScanLayout.find(
                                graphdef, trainable, weights.value, batch, task=task))
                            note(f"scan_layers: {weights.layout.describe()}")
                            train_step = step_maker(layout=weights.layout)
                        compiled[length] = train_step.lower(trainable, opt_state, weights.value,
                                                            batch, key).compile()
                    dt = time.perf_counter() - t0
                    compile_s += dt
                    clock["excluded"] += dt
                    note(f"compiled the train step for length {length} in {dt:.1f} s "
                         f"({len(compiled)} shape(s) so far)")
                trainable, opt_state, metrics = compiled[length](trainable, opt_state,
                                                                 weights.value, batch, key)
                step += 1
                pending.append((step, metrics))
                window["tokens"] += stream.last_tokens
                bar.update(1)
                logs = step % cfg.train.log_every == 0 or step == total
                evals = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
                saves = bool(cfg.train.save_every) and step % cfg.train.save_every == 0
                boundary = proc.at_boundary(step) and step < total
                if logs or boundary or ((evals or saves) and step < total):
                    flush()
                if boundary:  # (not timed as a train step)
                    trainable, frozen, opt_state, record = proc.boundary(
                        step, trainable, weights.per_block(), opt_state)
                    weights.set(frozen)
                    del frozen
                    log.write({"step": step, "split": "procedure", **record})
                    note(f"step {step}: {_fmt(record)}")
                if logs and window["n"]:
                    record = {"step": step, "loss": window["loss"] / window["n"],
                              "accuracy": window["acc"] / window["n"],
                              "lr": float(schedule(step - 1)),
                              "grad_norm": window["grad_norm"],
                              "tokens_per_s": window["tokens"] / max(window["t"], 1e-9),
                              "epoch": stream.position.epoch}
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                    window = {"loss": 0.0, "acc": 0.0, "n": 0, "tokens": 0, "t": 0.0,
                              "grad_norm": None}
                if evals and step < total:
                    best = _better(best, evaluate("validation", splits.validation), metric_name,
                                   step)
                if saves and step < total:
                    save("interval")
                if fault_step == step:  # fault injection for the resume tests (see above)
                    os.kill(os.getpid(), signal.SIGKILL)
                # a signal stops the run at the next step; with several processes they agree
                # on the step at log steps (a collective: it waits for the device)
                if jax.process_count() == 1 or logs:
                    if any_process(stop["signal"] is not None):
                        interrupted = stop["signal"] or "stopped by another process"
                        break
        flush()
        bar.close()
        save("interrupted" if interrupted else "final")
        ckpt.wait()
        if interrupted:
            print_fn(f"{interrupted}: saved a checkpoint at step {step} in {ckpt_dir}; continue "
                     "with train.resume=true")
        else:
            weights.hold_per_block()
            best = _better(best, evaluate("validation", splits.validation), metric_name, step)
            if splits.test:
                history["test"] = evaluate("test", splits.test)
            frozen = weights.per_block()
            if jax.process_count() > 1:  # every process gathers; the first one writes
                trainable, frozen = to_host(trainable), to_host(frozen)
            nnx.update(model, trainable, frozen)
            model = procedure.final_model(model)
            if primary:
                save_result(model, os.path.join(
                    out_dir, "adapter" if isinstance(model, PeftModel) else "model"), tok)
    finally:
        bar.close()
        ckpt.close()
        log.close()
    summary = {"steps": step, "total_steps": total, "interrupted": interrupted, **counts,
               # run: everything in this call (data, model load, evaluations, compiles, steps);
               # steps: the train steps themselves, this session only (not before a resume)
               "run_seconds": round(time.perf_counter() - t_start, 1),
               "step_seconds": round(step_s, 1), "compile_seconds": round(compile_s, 1),
               "compiled_shapes": sorted(compiled), "best": best, **history, **_peak_memory()}
    if primary:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if not interrupted:
        print_fn(_summary_text(summary))
    return summary


def _summary_text(s: dict) -> str:
    lines = [f"done: {s['steps']} steps; {s['run_seconds']} s in all, {s['step_seconds']} s in train "
             f"steps, {s['compile_seconds']} s compiling {len(s['compiled_shapes'])} train-step "
             f"shape(s) {s['compiled_shapes']}",
             f"trainable {s['trainable']:,d} / {s['total']:,d} parameters "
             f"({s['trainable_pct']:.3f}%)"]
    if s.get("best"):
        b = s["best"]
        lines.append(f"best validation {b['metric']}: {b['value']:.4f} at step {b['step']}")
    for key in ("test_before", "test"):
        if s.get(key):
            lines.append(f"{key}: {_fmt({k: v for k, v in s[key].items() if k != 'seconds'})}")
    mem = [f"{k} {v:.2f}" for k, v in s.items() if k.endswith("_gib")]
    if mem:
        lines.append("memory: " + ", ".join(mem))
    return "\n".join(lines)


def load_trained_model(cfg: RunConfig, *, step: int | None = None, progress: bool = True):
    """The run's model with the trainable weights of checkpoint ``step`` (default: the newest)
    written in. Returns ``(model, step)``."""
    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoints; train first (output_dir="
                                f"{cfg.output_dir!r})")
    ckpt = RunCheckpointer(ckpt_dir, keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint for step {step}; have {steps}")
        cfg = prepared(cfg, print_fn=lambda *a: None)
        model, heads = build_model(cfg, progress=progress)
        graphdef, trainable, frozen = split_model(model, modules=heads)
        optimizer = make_optimizer(cfg.train.optimizer_config(), lr_scales=cfg.procedure
                                   .procedure_config().learning_rate_scales(trainable))
        opt_abstract = jax.eval_shape(optimizer.init, trainable)
        rng = jax.random.key_data(jax.random.key(0))
        proc = cfg.procedure.procedure_config().attach(graphdef, trainable, frozen,
                                                        key=jax.random.key(0))
        state, _ = ckpt.restore(step, like=_checkpoint_state(trainable, opt_abstract, rng,
                                                             proc.saved_state(frozen)))
    finally:
        ckpt.close()
    nnx.update(model, state["trainable"])
    if "procedure" in state:
        nnx.update(model, proc.restored(frozen, state["procedure"]))
    return model, step


def evaluate_checkpoint(cfg: RunConfig, *, split: str = "test", step: int | None = None,
                        model_dir: str | None = None, progress: bool = True) -> dict:
    """Loss/accuracy (and generation accuracy when configured) of a checkpoint on a split:
    the run's checkpoint ``step``, or with ``model_dir`` a Hugging Face checkpoint (e.g. a
    merged model; loaded as stored, 4-bit layers included) with the run's tokenizer, data and
    evaluation settings."""
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, padding_side="left",
                         revision=cfg.model.revision)
    if model_dir is not None and step is not None:
        raise ValueError("step selects one of the run's checkpoints; with model_dir the model "
                         "is that checkpoint, so give one or the other")
    splits = load_splits(cfg.data, tok)
    if model_dir is not None:
        m = cfg.model
        model = from_pretrained(model_dir, task=run_task(cfg), dtype=jnp.dtype(m.dtype),
                                param_dtype=jnp.dtype(m.param_dtype or m.dtype),
                                progress=progress)
        step = None
    else:
        model, step = load_trained_model(cfg, step=step, progress=progress)
    examples = {"train": splits.train, "validation": splits.validation, "test": splits.test}[split]
    if not examples:
        raise ValueError(f"the data has no {split!r} split")
    heads = None if model_dir is not None else head_modules(cfg, model)
    graphdef, trainable, frozen = split_model(model, modules=heads)
    # one process, its own devices (a multi-process run's checkpoints restore into any mesh)
    mesh = make_mesh(dataclasses.replace(cfg.mesh.mesh_config(), distributed=False))
    trainable, frozen = shard_state(trainable, mesh), shard_state(frozen, mesh)
    with tracing_mesh(mesh):
        result = Evaluator(cfg, graphdef, run_task(cfg), tok, splits.buckets, mesh)(
            examples, trainable, frozen)
    return {"step": step, "split": split, **result}
