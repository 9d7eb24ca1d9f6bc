"""``get_peft_model`` and ``PeftModel``: a model with an adapter, as in Hugging Face PEFT.

Everything method-specific is a hook of the adapter's config (``peftjax.tuners._base``); this
file only dispatches.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._loading import hf_param_paths
from peftjax.tuners._base import PREFIX, AdapterParam, TunerConfig
from peftjax.tuners._layer import adapted_layers
from peftjax.tuners._lora import lora_layers


class _BaseStash:
    """Host copies of the base weights adapters train (``modules_to_save``, biases): their
    original values and what each inactive adapter trained, so every named adapter has its own
    (PEFT keeps a copy of such modules per adapter). Static to the module graph: compared by
    identity, so switching adapters does not change a compiled function's cache key."""

    def __init__(self):
        self.originals: dict[tuple, np.ndarray] = {}
        self.own: dict[str, dict[tuple, np.ndarray]] = {}


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or any(c in name for c in "./\\"):
        raise ValueError(f"adapter name {name!r}: use a non-empty string without '.', '/' or "
                         "'\\' (it becomes a key of the model state and a directory name)")


class PeftModel(nnx.Module):
    """The adapted model (``base_model``), one or more named adapters, and which are active.
    Calling it calls the model through the active adapter's method.

    As in PEFT: :func:`get_peft_model` adds an adapter named ``"default"`` (modifying the base
    model in place); :meth:`add_adapter` / :meth:`load_adapter` add more of the same method,
    :meth:`set_adapter` picks the active one (several at once for LoRA, whose effects add up),
    :meth:`delete_adapter` removes one, and :meth:`disable_adapter` is a context in which the
    model gives the base model's outputs. Only the active adapter trains. ``peft_config`` is
    the active adapter's config (PEFT's is a dict by name: that is ``peft_configs`` here).
    """

    def __init__(self, base_model: nnx.Module, peft_config: TunerConfig,
                 modules: dict[str, nnx.Module] | None = None, adapter_name: str = "default"):
        _check_name(adapter_name)
        self.base_model = base_model
        self.adapters = nnx.Dict({adapter_name: nnx.Dict(modules or {})})
        self._configs: tuple[tuple[str, TunerConfig], ...] = ((adapter_name, peft_config),)
        self._active: tuple[str, ...] = (adapter_name,)
        self._disabled = False
        self._stash = _BaseStash()
        self._adopt(adapter_name)
        peft_config.activate(self, self._active)

    # ------------------------------------------------------------------ adapters by name
    @property
    def peft_config(self) -> TunerConfig:
        """The active adapter's config."""
        return self.peft_configs[self._active[0]]

    @property
    def peft_configs(self) -> dict[str, TunerConfig]:
        """Adapter name -> config, for every adapter of the model (PEFT's ``peft_config``)."""
        return dict(self._configs)

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def added(self) -> nnx.Dict:
        """The modules the active adapter holds beside the model (a prompt encoder, ...)."""
        return self.adapters[self._active[0]]

    def add_adapter(self, adapter_name: str, peft_config: TunerConfig, *,
                    rngs: nnx.Rngs | None = None) -> None:
        """Adds a new adapter of the same method as the model's (not made active, as in PEFT:
        :meth:`set_adapter` activates it). ``rngs`` default: seeded from the name."""
        _check_name(adapter_name)
        if adapter_name in self.peft_configs:
            raise ValueError(f"the model already has an adapter named {adapter_name!r}; "
                             f"adapters: {list(self.peft_configs)}")
        if not isinstance(peft_config, TunerConfig):
            raise TypeError(f"expected a PEFT method config (LoraConfig, PromptTuningConfig, "
                            f"...), got {type(peft_config).__name__}")
        if type(peft_config) is not type(self.peft_config):
            raise ValueError(f"cannot combine adapters of different methods: the model's are "
                             f"{self.peft_config.method}, this one is {peft_config.method} (as "
                             "in PEFT; build a second PeftModel on another copy of the base)")
        config = peft_config.resolved(self.base_model)
        rngs = rngs if rngs is not None else nnx.Rngs(zlib.crc32(adapter_name.encode()))
        try:
            modules = config.inject(self.base_model, rngs=rngs, adapter_name=adapter_name)
        except Exception:
            config.remove(self, adapter_name)
            raise
        self.adapters[adapter_name] = nnx.Dict(modules)
        self._configs = self._configs + ((adapter_name, config),)
        self._adopt(adapter_name)
        config.activate(self, () if self._disabled else self._active)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             **options) -> None:
        """Adds ``adapter_name``: a weighted combination of ``adapters`` (not made active), with
        PEFT's semantics and option names. LoRA: ``combination_type`` (``svd`` by default,
        ``linear``, ``cat``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and
        their ``*_svd`` forms), ``svd_rank``, ``svd_clamp``, ``svd_full_matrices``,
        ``density``, ``majority_sign_method`` (``total`` / ``frequency``); DARE's random masks
        from ``seed`` (default 0) or a ``dare_mask(layer, part, index, shape, density)``
        function. (IA)³: the weighted sum of the vectors. Unlike PEFT, an existing name, an
        unknown adapter, a mismatch of lengths or a missing ``density`` is an error, not a
        silent no-op (see ``peftjax/tuners/_combine.py`` for the merge rules)."""
        _check_name(adapter_name)
        known = self.peft_configs
        if adapter_name in known:
            raise ValueError(f"the model already has an adapter named {adapter_name!r}")
        missing = [a for a in adapters if a not in known]
        if missing or not adapters:
            raise ValueError(f"add_weighted_adapter: no adapter named {missing or adapters}; "
                             f"the model has {list(known)}")
        if len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters but "
                             f"{len(weights)} weights")
        self._refuse_merged("combine adapters")
        known[adapters[0]].combine(self, list(adapters), [float(w) for w in weights],
                                   adapter_name, **options)

    def load_adapter(self, directory: str, adapter_name: str) -> None:
        """Adds the adapter stored in ``directory`` (PEFT format, same method as the model's)
        under ``adapter_name``, loading strictly (on a mismatch nothing changes)."""
        from peftjax.tuners._io import fill_adapter, read_config, stored_weights
        config = read_config(directory)
        stored, weights_path = stored_weights(directory, config)
        self.add_adapter(adapter_name, config.for_loading(), rngs=nnx.Rngs(0))
        try:
            with self._using(adapter_name):
                fill_adapter(self, stored, weights_path)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self._set_config(adapter_name, config.resolved(self.base_model))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Makes ``adapter_name`` the active adapter (what calls apply and training trains). A
        list makes several active at once, for methods whose effects add up (LoRA)."""
        names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
        known = self.peft_configs
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"no adapter named {unknown or names!r}; adapters: {list(known)}")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeated: {list(names)}")
        if len(names) > 1:
            alone = [n for n in names if not known[n].combinable]
            if alone:
                raise ValueError(f"{known[alone[0]].method} adapter {alone[0]!r} cannot be active "
                                 "together with others (see its config's `combinable`); set one")
            trains_base = [n for n in names if self._trained_base_paths(n)]
            if len(trains_base) > 1:
                raise ValueError(f"adapters {trains_base} each train base weights "
                                 "(modules_to_save / bias); at most one of the active adapters "
                                 "may")
        if self._disabled:
            raise RuntimeError("set_adapter inside disable_adapter(): leave the block first")
        self._refuse_merged("switching adapters")
        self._switch(names)

    def _switch(self, names: tuple[str, ...]) -> None:
        self._swap_base(self._active, names)
        self._active = names
        self.peft_config.activate(self, names)

    def _refuse_merged(self, what: str) -> None:
        merged = [n for n, layer in adapted_layers(self.base_model) if layer.merged]
        if merged:
            raise RuntimeError(f"adapters are merged into {len(merged)} layers (e.g. "
                               f"{merged[0]}); unmerge_adapter() before {what}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes an adapter; if it was active, the first remaining one becomes active (as in
        PEFT). The last adapter cannot be deleted: :meth:`unload` gives the base model back."""
        known = self.peft_configs
        if adapter_name not in known:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {list(known)}")
        if len(known) == 1:
            raise ValueError(f"{adapter_name!r} is the model's only adapter; unload() gives the "
                             "base model back")
        if adapter_name in self._active:
            rest = tuple(n for n in self._active if n != adapter_name)
            self.set_adapter(rest or next(n for n in known if n != adapter_name))
        known[adapter_name].remove(self, adapter_name)
        del self.adapters[adapter_name]
        self._configs = tuple((n, c) for n, c in self._configs if n != adapter_name)
        self._stash.own.pop(adapter_name, None)
        self._forget_originals()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block the model gives the base model's outputs (adapters off, trained
        base weights back at their original values); generation and ``init_cache`` too."""
        if self._disabled:
            yield
            return
        self._refuse_merged("disabling them")
        saved = self._active
        self._swap_base(saved, ())
        self.peft_config.activate(self, ())
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            self._swap_base((), saved)
            self.peft_config.activate(self, saved)

    @contextlib.contextmanager
    def _using(self, adapter_name: str):
        """Temporarily only ``adapter_name`` active (saving, loading one adapter)."""
        saved = self._active
        if saved == (adapter_name,):
            yield
            return
        self._switch((adapter_name,))
        try:
            yield
        finally:
            self._switch(saved)

    def _set_config(self, adapter_name: str, config: TunerConfig) -> None:
        self._configs = tuple((n, config if n == adapter_name else c) for n, c in self._configs)

    def _adopt(self, adapter_name: str) -> None:
        """Marks the adapter leaves just injected as ``adapter_name``'s and keeps the original
        values of the base weights it trains."""
        for _, var in nnx.to_flat_state(nnx.state(self, AdapterParam)):
            if "adapter" not in var.get_metadata():
                var.set_metadata("adapter", adapter_name)
        state = dict(nnx.to_flat_state(nnx.state(self.base_model, nnx.Param)))
        for path in self._trained_base_paths(adapter_name):
            value = state[path][...]
            if path not in self._stash.originals and not isinstance(value, jax.core.Tracer):
                # (a model built abstractly, e.g. for a memory plan, has no values to keep)
                self._stash.originals[path] = np.asarray(value)

    def _forget_originals(self) -> None:
        needed = set().union(*(self._trained_base_paths(n) for n in self.peft_configs))
        for path in set(self._stash.originals) - needed:
            del self._stash.originals[path]

    def _trained_base_paths(self, adapter_name: str) -> set[tuple]:
        """State paths of the base weights adapter ``adapter_name`` trains."""
        cfg = self.peft_configs[adapter_name]
        saved, self._active = self._active, (adapter_name,)  # its hooks read the active name
        try:
            return {tuple(p) for p, v in nnx.to_flat_state(nnx.state(self.base_model, nnx.Param))
                    if cfg.trains(("base_model",) + tuple(p), v, self)}
        finally:
            self._active = saved

    def _swap_base(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """Stores the trained base weights of adapters ``old`` and puts those of ``new`` (or
        the originals) in their place."""
        if not self._stash.originals:
            return
        state = {("base_model",) + tuple(p): v
                 for p, v in nnx.to_flat_state(nnx.state(self.base_model, nnx.Param))}
        for name in old:
            paths = [("base_model",) + p for p in self._trained_base_paths(name)]
            self._stash.own[name] = {p: np.asarray(state[p][...]) for p in paths}
            for p in paths:
                state[p][...] = jnp.asarray(self._stash.originals[p[1:]], state[p][...].dtype)
        for name in new:
            own = self._stash.own.get(name, {})
            for p in self._trained_base_paths(name):
                value = own.get(("base_model",) + p, self._stash.originals[p])
                var = state[("base_model",) + p]
                var[...] = jnp.asarray(value, var[...].dtype)

    # ------------------------------------------------------------------ calling the model
    def __call__(self, *args, dropout_rng=None, **kwargs):
        """Calls the model. ``dropout_rng`` turns on dropout: the model's own and the adapter's.
        ``task_ids`` [B] picks each row's prompt of a multi-task prompt bank."""
        if self._disabled:
            kwargs.pop("task_ids", None)
            return self.base_model(*args, dropout_rng=dropout_rng, **kwargs)
        if not self.peft_config.takes_task_ids:
            self._refuse_task_ids(kwargs.pop("task_ids", None))
        return self.peft_config.call(self, args, {**kwargs, "dropout_rng": dropout_rng})

    def _refuse_task_ids(self, task_ids) -> None:
        if task_ids is not None:
            raise ValueError(f"task_ids select prompts of a multi-task prompt bank "
                             f"(PromptTuningConfig(num_tasks=N)); {self.peft_config.method} has "
                             "no tasks")

    @property
    def config(self):
        return self.base_model.config

    def init_cache(self, batch: int, max_len: int, dtype=None, task_ids=None):
        """A KV cache for ``max_len`` caller tokens (plus whatever the method puts in front;
        ``task_ids`` pick a prompt bank's prompts)."""
        if self._disabled:
            return self.base_model.init_cache(batch, max_len, dtype)
        if task_ids is None:
            return self.peft_config.init_cache(self, batch, max_len, dtype)
        if not self.peft_config.takes_task_ids:
            self._refuse_task_ids(task_ids)
        return self.peft_config.init_cache(self, batch, max_len, dtype, task_ids=task_ids)

    def lora_layers(self):
        return lora_layers(self.base_model)

    def merge_adapter(self) -> None:
        """Adds the active adapters into their base weights (outputs unchanged; inference is
        faster)."""
        self._check_mergeable()
        for _, layer in adapted_layers(self.base_model):
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in adapted_layers(self.base_model):
            layer.unmerge()

    def merge_and_unload(self, dtype=None) -> nnx.Module:
        """Merges the active adapters into the weights and returns the plain base model (other
        adapters are dropped). Methods that cannot merge (prompts, prefixes) raise
        ``TypeError`` naming the reason.

        For LoRA, an adapted 4-bit layer becomes a float ``Linear`` holding dequantized base +
        adapter; ``peftjax.quant.quantize_model`` stores it in 4 bits again and reports the
        error that costs."""
        self._check_mergeable()
        return self.peft_config.merge_and_unload(self, dtype)

    def _check_mergeable(self):
        cfg = self.peft_config
        if not cfg.mergeable:
            raise TypeError(f"{cfg.method} cannot be merged into the weights: {cfg.merge_reason} "
                            "Serve the base model with the adapter instead.")

    def unload(self) -> nnx.Module:
        """Removes every adapter without merging and returns the base model: its weights are
        what they were before :func:`get_peft_model` (unless merged before), except base
        weights the active adapter trained (``modules_to_save``), which keep its values as in
        PEFT."""
        return self.peft_config.unload(self)

    def trainable_mask(self) -> nnx.State:
        """Pytree of bools over this model's state: True where a leaf trains. The active
        adapters' :class:`AdapterParam` leaves (except those marked ``frozen``, e.g. LoRA-FA's
        ``A``), and the base weights their method's ``trains`` adds (``modules_to_save``,
        biases)."""
        active = () if self._disabled else self._active
        base = set().union(*(self._trained_base_paths(n) for n in active))

        def trains(path, var) -> bool:
            if isinstance(var, AdapterParam):
                meta = var.get_metadata()
                return meta.get("adapter") in active and not meta.get("frozen", False)
            return path[0] == "base_model" and tuple(path[1:]) in base

        flat = nnx.to_flat_state(nnx.state(self))
        return nnx.from_flat_state([(p, trains(p, v)) for p, v in flat])

    def trained_base_entries(self, rename=lambda owner, key: key) -> dict:
        """PEFT key -> (variable, transposed) for the trained ``nnx.Param``s of the base model
        (``modules_to_save``, biases), under their Hugging Face names; ``rename(owner, key)``
        lets a method move a key to its wrapper level."""
        trained = self._trained_base_paths(self.active_adapter)
        state = dict(nnx.to_flat_state(nnx.state(self.base_model)))
        out = {}
        for key, (path, transposed) in hf_param_paths(self.base_model).items():
            if tuple(path) in trained:
                out[PREFIX + rename(key.rsplit(".", 1)[0], key)] = (state[path], transposed)
        return out

    def save_pretrained(self, directory: str, selected_adapters: list[str] | None = None) -> None:
        """Writes adapters in PEFT's format (adapter_config.json + adapter_model.safetensors),
        which PyTorch ``PeftModel.from_pretrained`` loads: as in PEFT, ``"default"`` into
        ``directory``, any other adapter into ``directory/<name>``. ``selected_adapters``
        default: all."""
        from peftjax.tuners._io import save_adapter
        names = list(self.peft_configs) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_configs]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; adapters: {list(self.peft_configs)}")
        for name in names:
            with self._using(name):
                save_adapter(self, directory if name == "default" else
                             os.path.join(directory, name))

    @classmethod
    def from_pretrained(cls, base: nnx.Module, directory: str,
                        adapter_name: str = "default") -> PeftModel:
        """Loads a PEFT-format adapter (written by peftjax or PyTorch PEFT) onto ``base``; the
        method comes from ``peft_type`` in its adapter_config.json."""
        from peftjax.tuners._io import load_adapter
        return load_adapter(base, directory, adapter_name)

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


def count_parameters(model: nnx.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; for a plain model nothing is trainable."""
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, AdapterParam))))
    total = sum(int(np.prod(v[...].shape)) for _, v in flat)
    if not isinstance(model, PeftModel):
        return 0, total
    mask = dict(nnx.to_flat_state(model.trainable_mask()))
    trainable = sum(int(np.prod(v[...].shape)) for p, v in flat if mask[tuple(p)])
    return trainable, total


def get_peft_model(model: nnx.Module, config: TunerConfig, *, rngs: nnx.Rngs,
                   adapter_name: str = "default") -> PeftModel:
    """Adds the adapter ``config`` describes to ``model`` (in place; any registered method) and
    returns it wrapped in a :class:`PeftModel`.

    Right after injection the outputs are the method's init behaviour (LoRA: equal to the base
    model's). Raises ``ValueError`` when the targets match nothing, listing the layer names.

    Example::

        model = from_pretrained(path)
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                              rngs=nnx.Rngs(0))
        peft.print_trainable_parameters()
    """
    if isinstance(model, PeftModel):
        raise ValueError("the model already has adapters; call get_peft_model on a plain model")
    if not isinstance(config, TunerConfig):
        raise TypeError(f"expected a PEFT method config (LoraConfig, PromptTuningConfig, ...), "
                        f"got {type(config).__name__}")
    _check_name(adapter_name)
    config = config.resolved(model)
    return PeftModel(model, config, config.inject(model, rngs=rngs, adapter_name=adapter_name),
                     adapter_name)
