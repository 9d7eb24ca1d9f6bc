"""Surgical fine-tuning (Lee et al. 2023): train only the transformer blocks that matter for
the new data, chosen by their relative gradient norm.

:func:`rank_layers` scores every block of a model on a few batches with one compiled gradient
pass and no training: the relative gradient norm ``||g|| / ||w||`` over the block's weights
(the gradient of the mean loss, averaged over the batches), and that score divided by the
largest block's. The ``surgical`` procedure uses it before the model is built:

- ``select: rgn`` (default) keeps the ``top_k`` blocks of highest score, ``first`` / ``last``
  the first or last ``top_k`` (the paper's manual choices); ``top_k: null`` keeps every block;
- the method then targets only those blocks: ``layers_to_transform`` for LoRA, Tied-LoRA and
  VeRA, ``leave_out`` (the other blocks) for bottleneck adapters, ``exclude_modules`` (a regex
  over the other blocks, PEFT's meaning) for (IA)³, and for
  ``peft.method: full`` only the weights inside those blocks train, with the model's new head;
- ``auto_lr: true`` multiplies each block's learning rate by its normalised score (the paper's
  Auto-RGN). The paper recomputes the scores at every step while training every weight;
  peftjax scores the pretrained weights once before training, so the same factors also serve
  methods whose trainable leaves start at zero (a LoRA ``B``), where a per-step
  ``||g|| / ||w||`` would be undefined.

The ranking is written to ``output_dir/layer_ranking.json`` (and printed as a table); a
resumed run, ``peftjax eval`` and ``peftjax export`` read it back, so every later use of the run
sees the same blocks. Scoring needs the full gradient of one batch (every weight's, as full
fine-tuning would) on a float copy of the model, also when the run trains over 4-bit weights.

YAML::

    peft: {method: lora, r: 8, target_modules: [query, key, value, dense]}
    procedure: {method: surgical, select: rgn, top_k: 2, auto_lr: false, score_batches: 4}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.procedures._base import ProcedureConfig, path_key, register_procedure
from peftjax.tuners._base import registered
from peftjax.tuners._targets import named_modules

SELECTIONS = ("rgn", "first", "last")
RANKING_FILE = "layer_ranking.json"


def transformer_blocks(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``[(dotted name, block)]`` of the model's transformer blocks, in order: the entries of
    the block list of the module that runs them (the one with a ``remat`` policy)."""
    for name, stack in named_modules(model):
        if not hasattr(stack, "remat"):
            continue
        for path, node in nnx.iter_graph(stack):
            if isinstance(node, nnx.List) and len(node) and all(
                    isinstance(b, nnx.Module) for b in node):
                prefix = ".".join([name, *map(str, path)])
                return [(f"{prefix}.{i}", b) for i, b in enumerate(node)]
    return []


def _in_block(key: str, block: str) -> bool:
    return f".{block}." in f".{key}."


def rank_layers(model: nnx.Module, batches, *, task: str, metric: str = "rgn") -> list[dict]:
    """Per transformer block of ``model`` (a plain model, no adapters): ``block`` (index),
    ``name``, ``grad_norm``, ``weight_norm``, ``rgn`` (their ratio) and ``score`` (``rgn`` over
    the largest block's). ``batches``: an iterable of batches as the train step takes them
    (``input_ids``, ``attention_mask``, ``labels``, ...). ``task``: the loss (``causal_lm``,
    ``sequence_classification``, ``token_classification``)."""
    # train sits above procedures: imported lazily
    from peftjax.train._losses import LOSSES, model_loss_sums
    if metric != "rgn":
        raise ValueError(f"metric={metric!r}: only 'rgn' (relative gradient norm) is defined")
    if task not in LOSSES:
        raise ValueError(f"task={task!r} has no loss; use one of {', '.join(LOSSES)}")
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to rank")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grads(params, rest, batch):
        def mean_loss(p):
            loss_sum, n, _ = model_loss_sums(nnx.merge(graphdef, p, rest), batch, task=task)
            return loss_sum / jnp.maximum(n, 1.0)
        return jax.grad(mean_loss)(params)

    total, count = None, 0
    for batch in batches:
        g = grads(params, rest, {k: jnp.asarray(v) for k, v in batch.items()})
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if not count:
        raise ValueError("rank_layers needs at least one batch")
    g_flat = {path_key(p): v for p, v in nnx.to_flat_state(total)}
    w_flat = {path_key(p): v for p, v in nnx.to_flat_state(params)}
    rows = []
    for i, (name, _) in enumerate(blocks):
        keys = [k for k in w_flat if _in_block(k, name)]
        g2 = sum(float(jnp.sum(jnp.square(g_flat[k][...].astype(jnp.float32)))) for k in keys)
        w2 = sum(float(jnp.sum(jnp.square(w_flat[k][...].astype(jnp.float32)))) for k in keys)
        g_norm, w_norm = np.sqrt(g2) / count, np.sqrt(w2)
        rows.append({"block": i, "name": name, "grad_norm": g_norm, "weight_norm": w_norm,
                     "rgn": g_norm / max(w_norm, 1e-30)})
    top = max(r["rgn"] for r in rows) or 1.0
    for r in rows:
        r["score"] = r["rgn"] / top
    return rows


def format_ranking(rows: list[dict], chosen=()) -> str:
    """The ranking as a text table (chosen blocks marked)."""
    lines = [f"{'block':>5}  {'grad norm':>10}  {'weight norm':>11}  {'RGN':>10}  {'score':>6}",
             ]
    for r in rows:
        mark = "  *" if r["block"] in chosen else ""
        lines.append(f"{r['block']:>5}  {r['grad_norm']:>10.4g}  {r['weight_norm']:>11.4g}  "
                     f"{r['rgn']:>10.4g}  {r['score']:>6.3f}{mark}")
    return "\n".join(lines)


# the field each layer method selects blocks with, by preference: PEFT's layers_to_transform,
# AdapterHub's leave_out, else PEFT's exclude_modules as a regex over the other blocks
_BLOCK_FIELDS = ("layers_to_transform", "leave_out", "exclude_modules")


@register_procedure
@dataclasses.dataclass(frozen=True)
class SurgicalConfig(ProcedureConfig):
    """Surgical fine-tuning's settings (see the module doc). ``block_scores`` is filled from
    the ranking when the run starts (what ``auto_lr`` multiplies by), never set by hand."""

    select: str = "rgn"
    top_k: int | None = None
    auto_lr: bool = False
    score_batches: int = 4
    metric: str = "rgn"
    block_scores: tuple[float, ...] | None = None
    blocks: tuple[str, ...] | None = None  # the block names, filled with block_scores

    method = "surgical"

    def __post_init__(self):
        p = []
        if self.select not in SELECTIONS:
            p.append(f"select={self.select!r} must be one of {SELECTIONS}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            p.append(f"top_k={self.top_k!r} must be an integer >= 1 (or null: every block)")
        if self.top_k is None and not self.auto_lr:
            p.append("with top_k: null every block trains, so set top_k (how many blocks to "
                     "train) or auto_lr: true (scale each block's learning rate)")
        if not (isinstance(self.score_batches, int) and self.score_batches >= 1):
            p.append(f"score_batches={self.score_batches!r} must be an integer >= 1")
        if self.metric != "rgn":
            p.append(f"metric={self.metric!r}: only 'rgn' (relative gradient norm) is defined")
        if p:
            raise ValueError("; ".join(p))

    def problems(self, run_cfg) -> list[str]:
        method = run_cfg.peft.method
        if method == "full" or self.blocks is not None:  # (resolved: the blocks are set)
            return []
        cls = registered().get(method)
        fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
        field = next((f for f in _BLOCK_FIELDS if f in fields), None)
        if field is None:
            return [f"surgical fine-tuning chooses transformer blocks; peft.method {method!r} "
                    "does not target blocks (use lora, tied_lora, vera, ia3, bottleneck or full)"]
        if run_cfg.peft.options.get(field) not in (None, [], ()) and self.blocks is None:
            return [f"peft.{field} is set, and the surgical procedure chooses the blocks; "
                    f"remove one of them"]
        return []

    @property
    def ranks(self) -> bool:
        """Whether the blocks must be scored (RGN selection or learning rates)."""
        return self.select == "rgn" or self.auto_lr

    def chosen(self, n_blocks: int, scores) -> list[int]:
        k = n_blocks if self.top_k is None else min(self.top_k, n_blocks)
        if self.select == "first":
            return list(range(k))
        if self.select == "last":
            return list(range(n_blocks - k, n_blocks))
        order = sorted(range(n_blocks), key=lambda i: (-scores[i], i))
        return sorted(order[:k])

    def prepare(self, run_cfg, *, load_model, batches, print_fn, fresh: bool = False):
        path = os.path.join(run_cfg.output_dir, RANKING_FILE)
        rows = None
        recorded = os.path.isfile(path) and not fresh
        if recorded:  # a resumed run, eval, export: the blocks chosen at the start
            with open(path) as f:
                rows = json.load(f).get("ranking")
            model = load_model(abstract=True)
        elif self.ranks:
            if batches is None:
                raise FileNotFoundError(f"{path}: the run's layer ranking is missing (written "
                                        "when the run starts); train first")
            model = load_model(abstract=False)
            rows = rank_layers(model, batches(self.score_batches), task=_task(run_cfg))
        else:
            model = load_model(abstract=True)
        names = [n for n, _ in transformer_blocks(model)]
        if not names:
            raise ValueError(f"{type(model).__name__} has no transformer blocks to choose from")
        scores = [r["score"] for r in rows] if rows else None
        if recorded and ((self.ranks and scores is None)
                         or (scores is not None and len(scores) != len(names))):
            raise ValueError(f"{path} does not hold scores for this model's {len(names)} blocks "
                             f"(select={self.select!r} needs them): the run was started with "
                             "other settings; use them, or a new output_dir")
        chosen = self.chosen(len(names), scores)
        if not recorded:
            os.makedirs(run_cfg.output_dir, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"select": self.select, "top_k": self.top_k, "chosen": chosen,
                           "blocks": names, "ranking": rows}, f, indent=2)
            os.replace(tmp, path)
            if rows:
                print_fn("layer ranking (relative gradient norm over "
                         f"{self.score_batches} batches; * = trained):\n"
                         + format_ranking(rows, chosen))
        print_fn(f"surgical fine-tuning: blocks {chosen} of {len(names)} train"
                 + (" (learning rates scaled by the block scores)" if self.auto_lr else ""))
        resolved = dataclasses.replace(self, block_scores=tuple(scores) if scores else None,
                                       blocks=tuple(names))
        heads = tuple(getattr(type(model), "new_head_params", ()))
        return _with_blocks(run_cfg, resolved, chosen, names, heads)

    def learning_rate_scales(self, trainable):
        if not self.auto_lr or not self.block_scores:
            return None
        top = max(self.block_scores) or 1.0

        def scale(path, _):
            key = path_key(tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
                                 for k in path))
            for name, s in zip(self.blocks, self.block_scores):
                if _in_block(key, name):
                    return s / top
            return 1.0
        return jax.tree_util.tree_map_with_path(scale, trainable)


def _task(run_cfg) -> str:
    if run_cfg.model.task:
        return run_cfg.model.task
    return ("sequence_classification" if run_cfg.data.format == "classification"
            else "causal_lm")


def _with_blocks(run_cfg, proc: SurgicalConfig, chosen: list[int], names: list[str],
                 heads: tuple[str, ...]):
    """``run_cfg`` with the procedure resolved and the method targeting blocks ``chosen``
    (full fine-tuning: those blocks and the model's new ``heads``)."""
    peft = run_cfg.peft
    if peft.method == "full":
        peft = dataclasses.replace(peft, method="head",
                                   head_modules=tuple(names[i] for i in chosen) + tuple(heads))
    else:
        fields = {f.name for f in dataclasses.fields(registered()[peft.method])}
        field = next(f for f in _BLOCK_FIELDS if f in fields)
        others = [i for i in range(len(names)) if i not in chosen]
        if field == "layers_to_transform":
            options = {**peft.options, field: list(chosen)}
        elif field == "leave_out":
            options = {**peft.options, field: others}
        else:  # e.g. (IA)³: every module inside the other blocks is excluded (a regex)
            regex = "(?:" + "|".join(re.escape(names[i]) for i in others) + r")\..*"
            options = {**peft.options, field: regex if others else None}
        peft = dataclasses.replace(peft, options=options)
    procedure = dataclasses.replace(run_cfg.procedure, options={
        k: getattr(proc, k) for k in ("select", "top_k", "auto_lr", "score_batches", "metric",
                                      "block_scores", "blocks")})
    return dataclasses.replace(run_cfg, peft=peft, procedure=procedure)
