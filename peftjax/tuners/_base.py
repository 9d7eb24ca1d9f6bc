"""What every PEFT method shares: the adapter variable type, the tuner protocol and the registry.

A method is one file under ``peftjax/tuners/`` that defines a frozen config dataclass deriving
from :class:`TunerConfig` and registers it with :func:`register`. The config carries PEFT's
class name, field names, defaults and ``peft_type``, and implements the hooks below; the
``PeftModel`` wrapper, the trainable mask, parameter counts, adapter files, the YAML ``peft``
section, the train step and the commands only talk to these hooks.

Hooks (defaults in :class:`TunerConfig`):

- ``resolved(model)``: the config with the fields PEFT fills from the model.
- ``inject(model, *, rngs, adapter_name) -> modules``: rewrites ``model`` in place (adapted
  layers, holding each adapter's leaves under its name) and/or returns new modules the
  ``PeftModel`` holds beside it under the adapter's name (a prompt encoder); the model's outputs
  right after injection are the method's documented init behaviour.
- ``activate(peft_model, names)`` / ``remove(peft_model, name)``: for methods that put leaves
  into the model's layers: which adapters those layers apply (none: disabled), and deleting
  one adapter's leaves. Hooks that read the adapter (``call``, ``peft_entries``, ...) use
  ``peft_model.added`` / ``peft_model.active_adapter``: the active adapter.
- ``call(peft_model, args, kwargs)``: runs the model; methods that add inputs (virtual tokens,
  task ids) do it here and give back outputs aligned with the caller's tokens.
- ``init_cache(peft_model, batch, max_len)``: the KV cache generation starts from; a method
  that puts tokens in front writes them into it once here, not per decoding step.
- ``trains(path, var, peft_model)``: which leaves other than :class:`AdapterParam` train
  (``modules_to_save``, biases).
- ``peft_entries(peft_model)``: PEFT key -> ``(variable, transposed)`` for everything the
  adapter file holds; one mapping serves saving, the strict check on loading, and loading.
- ``to_peft_dict()`` / ``from_peft_dict(data, path)``: ``adapter_config.json`` both ways,
  refusing options that change the math and are not implemented.
- ``combine(peft_model, adapters, weights, adapter_name, **options)``: a new adapter as a
  weighted combination of existing ones (``add_weighted_adapter``; LoRA, (IA)³).
- ``serving_terms(peft_model)``: what the active adapter does to each linear layer as
  :class:`ServingTerms` (low-rank factors, DoRA magnitudes, (IA)³ scales), the form in which
  ``peftjax.serving`` batches many adapters over one base; methods without it are not served.
  ``serving_prompt(peft_model)``: the virtual tokens' embeddings [V, E] a method puts in
  front of every input (soft prompts), served per row beside the layer terms; None by default.
- ``mergeable`` and ``merge_reason``: whether the adapter folds into the weights;
  ``combinable``: whether several adapters can be active at once (their effects add up).

File layout (PEFT's by default; a method whose ecosystem has another format overrides them):
``weight_files`` (the tensor files, the first one required), ``weight_fallbacks`` (PyTorch
pickles read in their place), ``weight_file(key)`` (which one holds a key),
``file_dict(peft_model)`` (the content of ``adapter_config.json``),
``extra_files(peft_model)`` (further JSON files), ``stored_key(key)`` (the form in which a stored
key is matched against ``peft_entries``), ``claims(data)`` (a config file in a format other
than PEFT's that the method reads).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from flax import nnx

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM",
              "QUESTION_ANS")
PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules


class AdapterParam(nnx.Variable):
    """Every leaf an adapter trains (LoRA factors, prompts, prefixes, gates, ...). Deliberately
    not an ``nnx.Param``: ``nnx.Param`` means frozen base weight. The trainable mask, parameter
    counts and sharding rules filter on this type, so a new method needs no edits there."""


def as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple, set)) else v


def in_modules(path: tuple, var: nnx.Variable, modules) -> bool:
    """Whether ``var`` at state ``path`` is a base-model weight inside one of ``modules``
    (dotted module names, matched wherever they occur: ``modules_to_save``)."""
    if not isinstance(var, nnx.Param) or path[0] != "base_model":
        return False
    name = ".".join(map(str, path[1:-1]))
    return any(f".{m}." in f".{name}." for m in modules or ())


@dataclasses.dataclass
class ServingTerms:
    """What one adapter does to one linear layer ``y = x W + b``, in the form a multi-adapter
    server applies per row of a batch::

        h = W (x * in_scale)                      # (IA)³ on a feed-forward input
        y = (magnitude * (h + scale * (x A) B) + b) * out_scale

    ``a_IxR`` [in, r] and ``b_RxO`` [r, out] (float32) are None without a low-rank change;
    ``magnitude_O`` is DoRA's ``m / ||W + s A B||`` (a constant at inference); ``in_scale_I``
    / ``out_scale_O`` are (IA)³ vectors. None means the identity.
    """

    a_IxR: Any = None
    b_RxO: Any = None
    scale: float = 0.0
    magnitude_O: Any = None
    in_scale_I: Any = None
    out_scale_O: Any = None

    @property
    def rank(self) -> int:
        return 0 if self.a_IxR is None else int(self.a_IxR.shape[1])


@dataclasses.dataclass(frozen=True)
class TunerConfig:
    """Base of every method's config (see the module docstring for the hooks)."""

    method: ClassVar[str]       # the YAML ``peft.method`` name
    peft_type: ClassVar[str]    # PEFT's ``peft_type`` in adapter_config.json
    mergeable: ClassVar[bool] = False
    combinable: ClassVar[bool] = False  # several adapters may be active together (LoRA)
    takes_task_ids: ClassVar[bool] = False  # a call may pass task_ids [B] (a prompt bank)
    merge_reason: ClassVar[str] = ""
    # adapter_config.json fields that carry no meaning for the saved adapter's outputs
    harmless_fields: ClassVar[frozenset] = frozenset(
        {"inference_mode", "revision", "auto_mapping", "peft_version", "peft_type"})

    def __hash__(self):  # a config is static metadata of the model graph, so it must hash
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def for_loading(self) -> TunerConfig:
        """The config to inject before stored tensors overwrite the initial values (e.g. no
        tokenizer needed for a text-initialised prompt)."""
        return self

    # ------------------------------------------------------------------ hooks with defaults
    def resolved(self, model: nnx.Module) -> TunerConfig:
        """The config with the fields PEFT fills from the model (shapes, default targets);
        what ``PeftModel.peft_config`` holds and adapter files record."""
        return self

    def inject(self, model: nnx.Module, *, rngs: nnx.Rngs,
               adapter_name: str = "default") -> dict[str, nnx.Module]:
        raise NotImplementedError

    def activate(self, peft_model, names: tuple[str, ...]) -> None:
        """Makes the model's adapted layers apply adapters ``names`` (empty: none)."""

    def remove(self, peft_model, adapter_name: str) -> None:
        """Deletes what ``inject`` put into the model's layers for ``adapter_name``."""

    def call(self, peft_model, args: tuple, kwargs: dict):
        return peft_model.base_model(*args, **kwargs)

    def trains(self, path: tuple, var: nnx.Variable, peft_model) -> bool:
        return False

    def init_cache(self, peft_model, batch: int, max_len: int, dtype=None):
        """The KV cache generation starts from (methods that put tokens of their own in front
        allocate and fill those slots here, once)."""
        return peft_model.base_model.init_cache(batch, max_len, dtype)

    def peft_entries(self, peft_model) -> dict[str, tuple[nnx.Variable, bool]]:
        raise NotImplementedError

    def unload(self, peft_model) -> nnx.Module:
        """Removes the method from the base model (without merging) and returns it."""
        return peft_model.base_model

    def merge_and_unload(self, peft_model, dtype=None) -> nnx.Module:
        raise TypeError(f"{type(self).__name__} cannot be merged into the weights: "
                        f"{self.merge_reason} Serve the base model with the adapter instead.")

    def combine(self, peft_model, adapters: list, weights: list, adapter_name: str,
                **options) -> None:
        """Adds ``adapter_name``, a weighted combination of ``adapters``
        (``PeftModel.add_weighted_adapter``; LoRA and (IA)³ define it, as in PEFT)."""
        raise TypeError(f"add_weighted_adapter is defined for LoRA and (IA)³ adapters (as in "
                        f"PEFT), not for {self.method}")

    def serving_terms(self, peft_model) -> dict[str, ServingTerms]:
        """Module path (under the base model) -> what the active adapter does to that linear
        layer (see :class:`ServingTerms`)."""
        raise TypeError(f"{self.method} adapters are not served by peftjax.serving's adapter "
                        "bank (it serves LoRA, DoRA, QA-LoRA, (IA)³ and prompt tuning adapters); "
                        "merge the adapter into the base (peftjax export) and serve the merged "
                        "model.")

    def serving_prompt(self, peft_model):
        """[V, E] (float32): embeddings the active adapter puts in front of every input, or
        None (see :meth:`serving_terms`)."""
        return None

    # ------------------------------------------------------------------------ file layout
    weight_files: ClassVar[tuple[str, ...]] = ("adapter_model.safetensors",)
    # a weight file -> the PyTorch pickle the format's own tools write instead (read with torch)
    weight_fallbacks: ClassVar[dict[str, str]] = {}

    def weight_file(self, key: str) -> str:
        return self.weight_files[0]

    def file_dict(self, peft_model) -> dict[str, Any]:
        return self.to_peft_dict()

    def extra_files(self, peft_model) -> dict[str, dict]:
        return {}

    def stored_key(self, key: str) -> str | None:
        """The form a stored key is matched in (None: a tensor of the format that is not part
        of the adapter, skipped)."""
        return key.replace(".default.", ".")  # very old PEFT files kept the adapter name

    @classmethod
    def claims(cls, data: dict) -> bool:
        return False

    def to_peft_dict(self) -> dict[str, Any]:
        data = {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}
        return {**data, "peft_type": self.peft_type, "inference_mode": True, "revision": None}

    @classmethod
    def from_peft_dict(cls, data: dict, path: str) -> TunerConfig:
        import warnings
        if isinstance(data.get("modules_to_save"), list):  # PEFT appends head names, repeated
            data = {**data, "modules_to_save": list(dict.fromkeys(data["modules_to_save"]))}
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - fields - cls.harmless_fields)
        if unknown:
            warnings.warn(f"{path}: ignoring fields {unknown} (from another PEFT version?).",
                          stacklevel=3)
        return cls(**{k: v for k, v in data.items() if k in fields})


_BY_PEFT_TYPE: dict[str, type[TunerConfig]] = {}
_BY_METHOD: dict[str, type[TunerConfig]] = {}


def register(cls: type[TunerConfig]) -> type[TunerConfig]:
    """Class decorator (above ``@dataclasses.dataclass``): makes a method known to
    ``get_peft_model``, adapter files and YAML."""
    cls.__hash__ = TunerConfig.__hash__  # dataclass(frozen=True) put a field hash there
    for table, key in ((_BY_PEFT_TYPE, cls.peft_type), (_BY_METHOD, cls.method)):
        if table.get(key, cls) is not cls:
            raise ValueError(f"{key!r} is registered twice ({table[key].__name__}, {cls.__name__})")
        table[key] = cls
    return cls


def registered() -> dict[str, type[TunerConfig]]:
    """YAML method name -> config class, for every registered method."""
    return dict(_BY_METHOD)


def config_for_peft_type(peft_type: str, path: str) -> type[TunerConfig]:
    if peft_type not in _BY_PEFT_TYPE:
        raise ValueError(f"{path}: peft_type={peft_type!r} is not implemented in peftjax; it "
                         f"loads {sorted(_BY_PEFT_TYPE)}.")
    return _BY_PEFT_TYPE[peft_type]


def config_for_file(data: dict, path: str) -> type[TunerConfig]:
    """The method a loaded ``adapter_config.json`` belongs to: one that claims its format, else
    its ``peft_type`` (PEFT files without one are LoRA)."""
    for cls in _BY_METHOD.values():
        if cls.claims(data):
            return cls
    return config_for_peft_type(data.get("peft_type", "LORA"), path)


def config_for_method(method: str) -> type[TunerConfig]:
    return _BY_METHOD[method]
