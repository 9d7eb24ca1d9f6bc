"""Run configuration: YAML validated into frozen dataclasses before anything heavy happens.

A run config has the sections ``model``, ``peft``, ``data``, ``train``, ``eval``, ``mesh``,
``quantization``, ``procedure`` and the key ``output_dir``. Unknown keys fail with the closest
valid key; bad values fail with the accepted range; ``section.key=value`` overrides (values
parsed as YAML) are applied first, so they are validated the same way.

Example::

    cfg = load_config("configs/quickstart.yaml", overrides=["train.lr=1e-4", "peft.r=16"])
    cfg.peft.tuner_config()     # -> peftjax.LoraConfig (or the method's config)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any

import yaml

from peftjax.procedures import ProcedureConfig, registered_procedures
from peftjax.quant._formats import QuantConfig
from peftjax.tuners._base import TunerConfig, registered


# ------------------------------------------------- settings the train package consumes
# (defined here, below train, so that config never imports the training machinery)

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. ``linear`` and ``cosine`` decay from ``learning_rate`` (after
    ``warmup_steps`` of linear warmup from 0) to ``learning_rate * final_lr_ratio`` at
    ``total_steps``; ``constant`` holds it after the warmup. Weight decay applies to matrices
    only (not to biases or norm scales), as the Hugging Face Trainer does.
    ``max_grad_norm=None`` turns clipping off."""

    learning_rate: float = 2e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        problems = []
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate!r} must be > 0")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be >= 0")
        if self.schedule != "constant":
            if self.total_steps is None:
                problems.append(f"schedule={self.schedule!r} needs total_steps")
            elif self.total_steps <= self.warmup_steps:
                problems.append(f"total_steps={self.total_steps} must exceed "
                                f"warmup_steps={self.warmup_steps}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            problems.append(f"final_lr_ratio={self.final_lr_ratio!r} must be in [0, 1]")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            problems.append(f"b1={self.b1!r} and b2={self.b2!r} must be in [0, 1)")
        if not self.eps > 0:
            problems.append(f"eps={self.eps!r} must be > 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm={self.max_grad_norm!r} must be > 0 (or None)")
        if problems:
            raise ValueError("invalid OptimizerConfig: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; ``-1`` on one axis takes the devices the others leave.
    ``distributed=True``: a multi-process run (``peftjax.train.initialize_distributed``, with
    its ``init_timeout_s`` and ``heartbeat_timeout_s``)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: bool = False
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"mesh (data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}): "
                             "sizes must be positive, with at most one -1")
        if self.init_timeout_s < 1 or self.heartbeat_timeout_s < 1:
            raise ValueError(f"init_timeout_s={self.init_timeout_s}, heartbeat_timeout_s="
                             f"{self.heartbeat_timeout_s}: timeouts must be >= 1 second")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and what is accepted."""


DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal_lm", "sequence_classification", "token_classification")
PLAIN_METHODS = ("head", "full")  # besides every registered PEFT method (peftjax.tuners)
DATA_FORMATS = ("classification", "instruction", "chat", "text")


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise(section: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"config section '{section}': " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """``path``: local directory, Hub id or ``pkg:PACKAGE[/SUBDIR]``. ``task``: default from the
    checkpoint. ``dtype``: compute dtype; ``param_dtype``: storage dtype of frozen weights.
    ``config_overrides``: ``config.json`` keys replaced before the model is built (e.g.
    ``rope_scaling: {rope_type: linear, factor: 2.0}`` for a longer context)."""

    path: str = ""
    task: str | None = None
    num_labels: int | None = None
    dtype: str = "float32"
    param_dtype: str | None = None
    revision: str | None = None
    tokenizer: str | None = None  # default: ``path``
    config_overrides: dict | None = None  # config.json keys replaced (e.g. rope_scaling)

    def __post_init__(self):
        p: list[str] = []
        _check(p, bool(self.path), "path is required (a model directory, Hub id or pkg:NAME)")
        _check(p, self.task is None or self.task in TASKS, f"task={self.task!r} must be one of {TASKS}")
        _check(p, self.num_labels is None or self.num_labels >= 1,
               f"num_labels={self.num_labels!r} must be >= 1")
        _check(p, self.dtype in DTYPES, f"dtype={self.dtype!r} must be one of {DTYPES}")
        _check(p, self.param_dtype is None or self.param_dtype in DTYPES,
               f"param_dtype={self.param_dtype!r} must be one of {DTYPES}")
        _raise("model", p)


def _method_fields(method: str) -> tuple[str, ...]:
    cls = registered().get(method)
    return tuple(f.name for f in dataclasses.fields(cls) if f.init) if cls else ()


@dataclasses.dataclass(frozen=True)
class PeftSection:
    """``method``: a PEFT method (``lora``, ``prompt_tuning``, ...; the other keys of the
    section are the fields of PEFT's config for that method, e.g. ``r`` or
    ``num_virtual_tokens``), ``head`` (train only ``head_modules``, e.g. the classifier) or
    ``full`` (every weight trains)."""

    method: str = "lora"
    head_modules: tuple[str, ...] | None = None
    options: dict = dataclasses.field(default_factory=dict)  # the method's keys

    def __post_init__(self):
        p: list[str] = []
        methods = tuple(registered()) + PLAIN_METHODS
        _check(p, self.method in methods, f"method={self.method!r} must be one of {methods}")
        if self.method in PLAIN_METHODS and self.options:
            p.append(f"keys {sorted(self.options)} only apply to a PEFT method, not "
                     f"method: {self.method}")
        _raise("peft", p)
        if self.method not in PLAIN_METHODS:
            try:
                self.tuner_config()
            except ValueError as e:
                raise ConfigError(f"config section 'peft': {e}") from None

    def tuner_config(self) -> TunerConfig | None:
        """The method's config (``LoraConfig``, ``PromptTuningConfig``, ...); None for
        ``head`` and ``full``."""
        if self.method in PLAIN_METHODS:
            return None
        return registered()[self.method](**self.options)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where the examples come from and how they become token batches (see ``peftjax.data``)."""

    source: str = ""
    format: str = "classification"
    train_split: str = "train"
    validation_split: str | None = "validation"
    test_split: str | None = "test"
    validation_fraction: float = 0.0
    max_examples: int | None = None
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    label_names: tuple[str, ...] | None = None
    task_field: str | None = None
    task_names: tuple[str, ...] | None = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    prompt_template: str | None = None
    response_template: str | None = None
    messages_field: str = "messages"
    use_chat_template: bool = False
    max_length: int = 128
    truncation_side: str = "right"
    packing: bool = False
    buckets: tuple[int, ...] | None = None
    shuffle_seed: int = 0
    group_by_length: bool = False

    def __post_init__(self):
        p: list[str] = []
        _check(p, bool(self.source), "source is required (files, a directory, a Hub dataset "
               "name or vader:movie_reviews)")
        _check(p, self.format in DATA_FORMATS, f"format={self.format!r} must be one of {DATA_FORMATS}")
        _check(p, 0.0 <= self.validation_fraction < 1.0,
               f"validation_fraction={self.validation_fraction!r} must be in [0, 1)")
        _check(p, self.max_examples is None or self.max_examples >= 1,
               f"max_examples={self.max_examples!r} must be >= 1")
        _check(p, self.max_length >= 2, f"max_length={self.max_length!r} must be >= 2")
        _check(p, self.truncation_side in ("left", "right"),
               f"truncation_side={self.truncation_side!r} must be 'left' or 'right'")
        if self.buckets is not None:
            _check(p, len(self.buckets) > 0 and all(b >= 1 for b in self.buckets)
                   and list(self.buckets) == sorted(set(self.buckets)),
                   f"buckets={list(self.buckets)} must be increasing positive lengths")
            _check(p, not self.buckets or self.buckets[-1] >= self.max_length,
                   f"the largest bucket {self.buckets and self.buckets[-1]} must be >= "
                   f"max_length={self.max_length}")
        _check(p, not self.packing or self.format in ("text", "instruction", "chat"),
               "packing applies to language-model formats (text, instruction, chat)")
        _check(p, not (self.packing and self.group_by_length),
               "group_by_length groups examples of similar lengths, but packed rows all have "
               "max_length tokens; set one of packing / group_by_length to false")
        _check(p, not (self.packing and self.task_field),
               "packing mixes examples of different tasks in one row; with task_field set, "
               "set packing: false")
        _check(p, self.task_names is None or bool(self.task_field),
               "task_names needs task_field (the row field naming each example's task)")
        _raise("data", p)


# OptimizerConfig keys written directly in the train section (``lr`` stands for learning_rate;
# total_steps comes from steps/epochs)
_OPTIMIZER_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizerConfig)
                          if f.name not in ("learning_rate", "total_steps"))


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Steps, batch, optimizer (``lr`` and the other ``OptimizerConfig`` keys: ``schedule``,
    ``warmup_steps``, ``weight_decay``, ``max_grad_norm``, ...), remat, scanning identical
    blocks (``scan_layers``: one compiled block for the stack), logging, evaluation and
    checkpoint cadence. ``steps`` wins over ``epochs`` when both are set."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    accum_steps: int = 1
    lr: float = 2e-4
    remat: str = "none"
    scan_layers: bool = False
    dropout: bool = True
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    resume: bool = False
    optimizer: dict = dataclasses.field(default_factory=dict)  # filled from the OptimizerConfig keys

    def __post_init__(self):
        p: list[str] = []
        _check(p, self.steps is not None or self.epochs is not None, "set steps or epochs")
        _check(p, self.steps is None or self.steps >= 1, f"steps={self.steps!r} must be >= 1")
        _check(p, self.epochs is None or self.epochs > 0, f"epochs={self.epochs!r} must be > 0")
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size!r} must be >= 1")
        _check(p, self.accum_steps >= 1 and self.batch_size % self.accum_steps == 0,
               f"accum_steps={self.accum_steps!r} must be >= 1 and divide batch_size={self.batch_size}")
        _check(p, self.lr > 0, f"lr={self.lr!r} must be > 0")
        for name in ("log_every", "eval_every", "save_every"):
            v = getattr(self, name)
            _check(p, v is None or v >= 1, f"{name}={v!r} must be >= 1 (or null for never)")
        _check(p, self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints!r} must be >= 1")
        try:
            from peftjax.models._layers import remat_policy
            remat_policy(self.remat)
        except ValueError as e:
            p.append(str(e))
        _raise("train", p)
        try:
            self.optimizer_config(self.steps)
        except ValueError as e:
            raise ConfigError(f"config section 'train': {e}") from None

    def optimizer_config(self, total_steps: int | None = None) -> OptimizerConfig:
        """The optimizer of ``total_steps`` steps. ``None`` when only the optimizer's state
        layout matters (dry runs, restoring a checkpoint): a decaying schedule then gets the
        shortest valid length, ``warmup_steps + 1``."""
        if total_steps is None:
            total_steps = self.optimizer.get("warmup_steps", 0) + 1
        return OptimizerConfig(learning_rate=self.lr, total_steps=total_steps, **self.optimizer)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """``generation``: also score greedy generations against the expected response (instruction
    format); ``test_before``: evaluate the test split before training too."""

    batch_size: int = 32
    max_examples: int | None = None  # evaluate on the first N examples of each split
    generation: bool = False
    max_new_tokens: int = 8
    test_before: bool = True

    def __post_init__(self):
        p: list[str] = []
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size!r} must be >= 1")
        _check(p, self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        _check(p, self.max_examples is None or self.max_examples >= 1,
               f"max_examples={self.max_examples!r} must be >= 1 (or null for all)")
        _raise("eval", p)


@dataclasses.dataclass(frozen=True)
class QuantizationSection:
    """4-bit storage of the frozen linear layers (QLoRA). ``quant_type``: ``nf4``, ``fp4``,
    ``int4`` (group-wise, GPTQ's format; ``blocksize`` is the group size) or null (off, the
    default). The other keys are :class:`peftjax.quant.QuantConfig`'s; a
    transformers ``BitsAndBytesConfig`` name (``bnb_4bit_quant_type``, ...) is answered with
    the name to use."""

    quant_type: str | None = None
    double_quant: bool | None = None
    compute_dtype: str = "bfloat16"
    blocksize: int = 64
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        try:
            self.quant_config()
        except ValueError as e:
            raise ConfigError(f"config section 'quantization': {e}") from None

    def quant_config(self) -> QuantConfig | None:
        if self.quant_type is None:
            return None
        kw = {} if self.skip_modules is None else {"skip_modules": self.skip_modules}
        return QuantConfig(self.quant_type, self.double_quant, self.compute_dtype, self.blocksize,
                           **kw)


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: bool = False  # several processes (peftjax launch); see MeshConfig
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def __post_init__(self):
        try:
            self.mesh_config()
        except ValueError as e:
            raise ConfigError(f"config section 'mesh': {e}") from None

    def mesh_config(self) -> MeshConfig:
        return MeshConfig(self.data, self.fsdp, self.tensor, self.distributed,
                          self.init_timeout_s, self.heartbeat_timeout_s)


@dataclasses.dataclass(frozen=True)
class ProcedureSection:
    """A training procedure around the train step (``peftjax.procedures``): ``method``
    ``relora`` (or null, the default: none); the other keys are that procedure's fields."""

    method: str | None = None
    options: dict = dataclasses.field(default_factory=dict)  # the procedure's keys

    def __post_init__(self):
        known = tuple(registered_procedures())
        if self.method is None:
            if self.options:
                raise ConfigError(f"config section 'procedure': keys {sorted(self.options)} "
                                  f"need a method (one of {known})")
            return
        if self.method not in known:
            raise ConfigError(f"config section 'procedure': method={self.method!r} must be "
                              f"one of {known} (or null)")
        try:
            self.procedure_config()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config section 'procedure': {e}") from None

    def procedure_config(self) -> ProcedureConfig:
        """The procedure's config; the base class (every hook a no-op) when none is set."""
        if self.method is None:
            return ProcedureConfig()
        return registered_procedures()[self.method](**self.options)


# the tuner fields that set an adapter's dropout (LoRA / Tied-LoRA, VeRA, bottleneck adapters)
_ADAPTER_DROPOUT = ("lora_dropout", "vera_dropout", "dropout")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    data: DataSection
    train: TrainSection
    peft: PeftSection = dataclasses.field(default_factory=PeftSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    quantization: QuantizationSection = dataclasses.field(default_factory=QuantizationSection)
    procedure: ProcedureSection = dataclasses.field(default_factory=ProcedureSection)
    output_dir: str = "runs/run"

    def __post_init__(self):
        problems = self.procedure.procedure_config().problems(self)
        if problems:
            raise ConfigError("config section 'procedure': " + "; ".join(problems))
        if self.data.task_field:
            tuner = self.peft.tuner_config()
            n = getattr(tuner, "num_tasks", 1)
            if n < 2:
                raise ConfigError(
                    f"data.task_field={self.data.task_field!r} gives each example a task, which "
                    "selects a prompt of a multi-task prompt bank: set peft.method: "
                    "prompt_tuning with num_tasks >= 2 (or remove data.task_field)")
            if self.data.task_names is not None and len(self.data.task_names) != n:
                raise ConfigError(f"data.task_names lists {len(self.data.task_names)} tasks but "
                                  f"peft.num_tasks={n}")
        if not self.train.dropout:
            tuner = self.peft.tuner_config()
            on = [f"peft.{name}={getattr(tuner, name)}" for name in _ADAPTER_DROPOUT
                  if getattr(tuner, name, 0)]
            if on:
                raise ConfigError(
                    f"{', '.join(on)} would do nothing: train.dropout=false turns every dropout "
                    "off, the adapter's too (the train step gets no dropout key); set it to 0, "
                    "or set train.dropout: true (the model's own dropout is then on as well)")
        if self.quantization.quant_type is not None and self.peft.method == "full":
            raise ConfigError(
                f"peft.method='full' cannot train the {self.quantization.quant_type} (4-bit) "
                "weights the quantization section asks for; use peft.method=lora (QLoRA) or "
                "head, or set quantization.quant_type=null")

    def to_dict(self) -> dict:
        """Plain nested dict; ``config_from_dict(cfg.to_dict()) == cfg``."""
        out = dataclasses.asdict(self)
        for cls, bag in _PASS_THROUGH.items():
            section = next(k for k, c in _SECTIONS.items() if c is cls)
            out[section].update(out[section].pop(bag))
        return _plain(out)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


_SECTIONS = {"model": ModelSection, "peft": PeftSection, "data": DataSection,
             "train": TrainSection, "eval": EvalSection, "mesh": MeshSection,
             "quantization": QuantizationSection, "procedure": ProcedureSection}


# names from the Hugging Face Trainer / other tools -> ours
ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_train_epochs": "epochs",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "accum_steps",
           "max_seq_length": "max_length", "lora_r": "r", "lr_scheduler_type": "schedule",
           "gradient_checkpointing": "remat", "model_name_or_path": "path", "dataset": "source",
           "bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
           "bnb_4bit_compute_dtype": "compute_dtype", "llm_int8_skip_modules": "skip_modules"}


def _closest(key: str, valid) -> str:
    if ALIASES.get(key) in valid:
        return f"; did you mean '{ALIASES[key]}'?"
    # a key that extends or abbreviates a valid one ("lrate" -> "lr", "max_len" -> "max_length")
    stems = sorted((k for k in valid if key.startswith(k) or k.startswith(key)), key=len)
    if stems:
        return f"; did you mean '{stems[-1] if key.startswith(stems[-1]) else stems[0]}'?"
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Checks ``value`` against a field's annotation (``int``, ``float``, ``str | None``,
    ``tuple[str, ...]``, ``dict`` ...) and converts lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(where, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(f"{where}[{i}]", v, inner) for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        return value
    return value


# sections whose extra keys are another dataclass's fields, collected in one dict field
_PASS_THROUGH = {PeftSection: "options", TrainSection: "optimizer",
                 ProcedureSection: "options"}


def _pass_through(cls, raw: dict) -> tuple[str | None, type | None, tuple[str, ...]]:
    """(bag field, dataclass whose fields the section's extra keys are, those fields)."""
    if cls is PeftSection:
        method = raw.get("method", "lora")
        target = registered().get(method) if isinstance(method, str) else None
        return "options", target, _method_fields(method) if target else ()
    if cls is TrainSection:
        return "optimizer", OptimizerConfig, _OPTIMIZER_FIELDS
    if cls is ProcedureSection:
        method = raw.get("method")
        target = registered_procedures().get(method) if isinstance(method, str) else None
        return "options", target, tuple(f.name for f in dataclasses.fields(target)
                                         if f.init) if target else ()
    return None, None, ()


def _section(name: str, cls, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{name}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    bag, target, extra = _pass_through(cls, raw)
    target_hints = typing.get_type_hints(target) if target else {}
    fields = {f.name for f in dataclasses.fields(cls)} - {bag}
    kwargs, passed = {}, {}
    for key, value in raw.items():
        if key in fields:
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        elif key in extra:
            passed[key] = _coerce(f"{name}.{key}", value, target_hints[key])
        elif cls is ProcedureSection and target is None:
            raise ConfigError(f"unknown key '{name}.{key}': set {name}.method first (one of "
                              f"{sorted(registered_procedures())}); its keys follow")
        else:
            raise ConfigError(f"unknown key '{name}.{key}'{_closest(key, sorted(fields | set(extra)))}")
    if bag:
        kwargs[bag] = passed
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config section '{name}': {e}") from None


def config_from_dict(raw: dict) -> RunConfig:
    """Validates a nested dict (parsed YAML) into a :class:`RunConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config is a mapping of sections, got {type(raw).__name__}")
    valid = list(_SECTIONS) + ["output_dir"]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"unknown top-level key '{key}'{_closest(key, valid)}")
    for required in ("model", "data", "train"):
        if required not in raw:
            raise ConfigError(f"the config has no '{required}' section")
    out_dir = raw.get("output_dir", "runs/run")
    if not isinstance(out_dir, str) or not out_dir:
        raise ConfigError(f"output_dir={out_dir!r}: expected a directory path")
    sections = {name: _section(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()}
    return RunConfig(**sections, output_dir=out_dir)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``section.key=value`` strings (value parsed as YAML) to a nested dict copy."""
    import copy
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return raw


def load_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Reads a YAML run config, applies overrides, validates. Raises :class:`ConfigError`."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    try:
        return config_from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
