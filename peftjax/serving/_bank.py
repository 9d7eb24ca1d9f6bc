"""The adapter bank: many adapters over one frozen base, each row of a batch applying its own.

Every linear layer the bank covers is wrapped in a :class:`BankLayer` (the layer's own class
with the bank in front, as the tuners' adapted layers are) that holds no arrays of its own: the
bank is a plain pytree ``{layer path: {"A": [N, in, R], "B": [N, R, out], "scale": [N],
"magnitude": [N, out], "in_scale": [N, in], "out_scale": [N, out]}}`` passed into the compiled
function beside the base weights, and the row -> slot table [B] comes with it through
:func:`rows_use`. Each row gathers its slot's factors and runs the batched products
``(x A[slot]) B[slot]`` (Punica's BGMV), so any mix of adapters runs in one program. Slot 0 is
"no adapter" (zeros and ones): those rows compute exactly the base model.

Adapters of any rank up to ``R`` share the bank (zero padding changes nothing), with their own
scaling (alpha / r, rsLoRA, rank and alpha patterns), targets (a layer an adapter leaves alone
gets zeros), DoRA magnitudes (``m / ||W + s A B||``, a constant at inference, so DoRA costs one
multiply, where PEFT cannot batch DoRA adapters at all) and (IA)³ vectors, following
:class:`peftjax.tuners.ServingTerms`.

Soft prompts (prompt tuning) sit in the same bank under the key :data:`PROMPT`: each slot's
virtual-token embeddings [N, V_max, E] (zero-padded) with their count on the host; the engine
puts a row's prompt in front of its tokens at prefill, as ``PeftModel`` does for one adapter.

The host side (:class:`AdapterBank`) keeps every registered adapter's terms in host memory and
at most ``N - 1`` of them on the device, least recently used out first (S-LoRA's swapping); a
slot in use by a running request is never evicted.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import types

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models._layers import Linear, param_value
from peftjax.tuners import ServingTerms
from peftjax.tuners._layer import AdaptedLayer, adapted_class, take_over
from peftjax.tuners._targets import find_targets, get_submodule, set_submodule

FIELDS = ("A", "B", "scale", "magnitude", "in_scale", "out_scale")
PROMPT = "\0prompt"  # the bank entry of the soft prompts (no layer path looks like it)

# (bank pytree, row slots [B]) of the forward pass being traced (trace-time state, as the
# tuners' dropout key): set by the engine around every model call
_ROWS: contextvars.ContextVar = contextvars.ContextVar("serving_rows", default=None)


@contextlib.contextmanager
def rows_use(bank: dict, slots_B: jax.Array):
    """Bank layers called inside this block apply bank slot ``slots_B[b]`` to row ``b``."""
    token = _ROWS.set((bank, slots_B))
    try:
        yield
    finally:
        _ROWS.reset(token)


class BankMixin:
    """In front of a linear layer class: applies each row's adapter from the bank."""

    base_cls: type

    def __init__(self, base: Linear, path: str):
        take_over(self, base)
        self.bank_path = path

    def __call__(self, x_BTI):
        ctx = _ROWS.get()
        if ctx is None:
            raise RuntimeError(f"{self.bank_path}: an adapter-bank layer was called outside the "
                               "serving engine (no row -> adapter table); call the engine, or "
                               "the original model for single-adapter use.")
        bank, slots_B = ctx
        t = {k: v[slots_B] for k, v in bank[self.bank_path].items()}
        dt, f32 = jnp.dtype(self.dtype), jnp.float32
        h = (x_BTI.astype(f32) * t["in_scale"][:, None, :]).astype(x_BTI.dtype)
        y = super().__call__(h)
        xa = jnp.einsum("bti,bir->btr", x_BTI.astype(dt), t["A"].astype(dt))
        d = jnp.einsum("btr,bro->bto", xa, t["B"].astype(dt)) * t["scale"].astype(dt)[:, None, None]
        mag = t["magnitude"].astype(dt)[:, None, :]
        base = y if self.bias is None else y - param_value(self.bias).astype(dt)
        y = y + (mag - 1) * base + mag * d
        return (y.astype(f32) * t["out_scale"][:, None, :]).astype(y.dtype)


def select_layers(model, targets) -> list[str]:
    """Paths of the linear layers ``targets`` selects, by PEFT's ``target_modules`` rules
    (``"all-linear"``, names, paths or a regex; :func:`peftjax.tuners._targets.find_targets`);
    an empty list selects none (the plain base)."""
    if isinstance(targets, (list, tuple)) and not targets:
        return []
    return find_targets(model, types.SimpleNamespace(target_modules=targets,
                                                     exclude_modules=None, modules_to_save=None))


def install(model, paths: list[str]) -> dict[str, tuple[int, int]]:
    """Wraps the layers ``paths`` of ``model`` (in place) as bank layers; returns their
    ``(in_features, out_features)`` and the logical axes of their weights."""
    shapes, axes = {}, {}
    for p in paths:
        layer = get_submodule(model, p)
        if isinstance(layer, BankMixin):
            raise ValueError(f"{p} already belongs to an adapter bank")
        if isinstance(layer, AdaptedLayer):
            raise ValueError(f"{p} carries adapters of a tuner ({type(layer).__name__}); "
                             "serve the plain base model and register the adapters with it")
        set_submodule(model, p, adapted_class(BankMixin, type(layer))(layer, p))
        shapes[p] = (layer.in_features, layer.out_features)
        axes[p] = tuple(layer.weight_axes)
    return shapes, axes


def bank_shardings(shapes: dict, axes: dict, slots: int, rank: int, mesh, prompt_shape=None):
    """Where the bank lives on ``mesh``: each factor beside the rows/columns of the weight it
    adapts (as LoRA factors in training), the slot axis replicated."""
    from jax.sharding import NamedSharding

    from peftjax.train._sharding import partition_spec

    def at(logical, shape):
        return NamedSharding(mesh, partition_spec(logical, shape, mesh))
    out = {}
    for p, (i, o) in shapes.items():
        ia, oa = axes[p]
        out[p] = dict(A=at((None, ia, "lora_rank"), (slots, i, rank)),
                      B=at((None, "lora_rank", oa), (slots, rank, o)),
                      scale=at((None,), (slots,)), magnitude=at((None, oa), (slots, o)),
                      in_scale=at((None, ia), (slots, i)), out_scale=at((None, oa), (slots, o)))
    if prompt_shape is not None:
        out[PROMPT] = dict(embeds=at((None, None, "embed"), (slots,) + tuple(prompt_shape)))
    return out


def empty_bank(shapes: dict, slots: int, rank: int, prompt_shape=None) -> dict:
    """The device bank with every slot empty (the base model)."""
    prompts = {} if prompt_shape is None else {
        PROMPT: dict(embeds=jnp.zeros((slots,) + tuple(prompt_shape), jnp.float32))}
    return prompts | {p: dict(A=jnp.zeros((slots, i, rank), jnp.float32),
                    B=jnp.zeros((slots, rank, o), jnp.float32),
                    scale=jnp.zeros((slots,), jnp.float32),
                    magnitude=jnp.ones((slots, o), jnp.float32),
                    in_scale=jnp.ones((slots, i), jnp.float32),
                    out_scale=jnp.ones((slots, o), jnp.float32)) for p, (i, o) in shapes.items()}


def slot_values(shapes: dict, rank: int, terms: dict[str, ServingTerms]) -> dict:
    """One slot's contents (host arrays) for an adapter's terms, padded to the bank's rank."""
    out = {}
    for p, (i, o) in shapes.items():
        t = terms.get(p, ServingTerms())
        a, b = np.zeros((i, rank), np.float32), np.zeros((rank, o), np.float32)
        if t.a_IxR is not None:
            a[:, :t.rank] = np.asarray(t.a_IxR, np.float32)
            b[:t.rank] = np.asarray(t.b_RxO, np.float32)
        ones = lambda n, v: np.ones((n,), np.float32) if v is None else np.asarray(v, np.float32)  # noqa: E731
        out[p] = dict(A=a, B=b, scale=np.float32(t.scale if t.a_IxR is not None else 0.0),
                      magnitude=ones(o, t.magnitude_O), in_scale=ones(i, t.in_scale_I),
                      out_scale=ones(o, t.out_scale_O))
    return out


def _write_slot(bank: dict, slot, values: dict) -> dict:
    return jax.tree.map(lambda b, v: b.at[slot].set(v.astype(b.dtype)), bank, values)


class AdapterBank:
    """Registered adapters (host) and the device bank's slots, with LRU swapping.

    ``slots`` counts slot 0 (the base model), so ``slots - 1`` adapters are on the device at a
    time; any number may be registered.
    """

    def __init__(self, shapes: dict, *, slots: int, rank: int, prompt_shape=None,
                 shardings=None):
        if slots < 2:
            raise ValueError(f"an adapter bank needs at least 2 slots (slot 0 is the base model); "
                             f"got {slots}")
        if rank < 1:
            raise ValueError(f"the bank's rank must be >= 1, got {rank}")
        self.shapes, self.slots, self.rank = shapes, slots, rank
        self.prompt_shape = None if prompt_shape is None else tuple(prompt_shape)  # (V_max, E)
        self.virtual: dict[str, int] = {}          # name -> virtual tokens of its prompt
        self.slot_virtual = np.zeros(slots, np.int32)  # virtual tokens in each device slot
        self.device = jax.device_put(empty_bank(shapes, slots, rank, prompt_shape),
                                     jax.devices()[0] if shardings is None else shardings)
        self._write_fn = jax.jit(_write_slot, donate_argnums=0, out_shardings=shardings)
        self.host: dict[str, dict] = {}            # name -> slot values (host arrays)
        self.resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order
        self.pins = np.zeros(slots, np.int64)      # running requests per slot
        self.loads = 0                             # slot writes (swaps in), for stats
        self._retired = 0

    def add(self, name: str, terms: dict[str, ServingTerms], prompt=None) -> None:
        """Registers ``name``: its layer terms and its soft prompt [V, E] (or None)."""
        if prompt is not None:
            V, E = np.shape(prompt)
            if self.prompt_shape is None or V > self.prompt_shape[0]:
                raise ValueError(f"adapter {name!r} puts {V} virtual tokens in front; the bank "
                                 f"holds {0 if self.prompt_shape is None else self.prompt_shape[0]}"
                                 f"; start the engine with max_virtual_tokens >= {V}.")
            if E != self.prompt_shape[1]:
                raise ValueError(f"adapter {name!r}: prompt width {E}, the model's "
                                 f"{self.prompt_shape[1]}")
        too_big = max((t.rank for t in terms.values()), default=0)
        if too_big > self.rank:
            raise ValueError(f"adapter {name!r} has rank {too_big}, above the bank's max_rank "
                             f"{self.rank}; start the engine with max_rank >= {too_big}.")
        outside = sorted(set(terms) - set(self.shapes))
        if outside:
            raise ValueError(f"adapter {name!r} adapts layers the bank does not cover: "
                             f"{outside[:6]}; start the engine with targets that include them "
                             "(e.g. targets='all-linear').")
        for p, t in terms.items():
            i, o = self.shapes[p]
            if t.a_IxR is not None and (tuple(t.a_IxR.shape) != (i, t.rank) or
                                        tuple(t.b_RxO.shape) != (t.rank, o)):
                raise ValueError(f"adapter {name!r}: {p} factors {tuple(t.a_IxR.shape)} x "
                                 f"{tuple(t.b_RxO.shape)} do not fit the layer ({i} -> {o}).")
        values = slot_values(self.shapes, self.rank, terms)
        if self.prompt_shape is not None:
            embeds = np.zeros(self.prompt_shape, np.float32)
            if prompt is not None:
                embeds[:len(prompt)] = np.asarray(prompt, np.float32)
            values[PROMPT] = dict(embeds=embeds)
        if name in self.host:  # replaced: running requests finish on the old version
            self.remove(name)
        self.host[name] = values
        self.virtual[name] = 0 if prompt is None else int(np.shape(prompt)[0])

    def remove(self, name: str) -> None:
        del self.host[name]
        del self.virtual[name]
        slot = self.resident.pop(name, None)
        if slot is not None and self.pins[slot]:  # still used by running rows: keep the slot
            self._retired += 1  # pinned under a name no request asks for; evicted once free
            self.resident[f"\0retired {self._retired}: {name}"] = slot

    def acquire(self, name: str | None) -> int | None:
        """The device slot of ``name`` (None: the base model, slot 0), loading it into a free
        or least recently used unpinned slot if needed, and pinned for one running request;
        None when every slot is pinned (the request waits)."""
        if name is None:
            return 0
        slot = self.resident.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._write(slot, name)
            self.resident[name] = slot
        self.resident.move_to_end(name)
        self.pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot:
            self.pins[slot] -= 1

    def _free_slot(self) -> int | None:
        used = set(self.resident.values())
        for s in range(1, self.slots):
            if s not in used:
                return s
        for n, s in self.resident.items():  # least recently used first
            if not self.pins[s]:
                del self.resident[n]
                return s
        return None

    def _write(self, slot: int, name: str) -> None:
        # dispatched asynchronously: the copy overlaps whatever the device is running
        self.device = self._write_fn(self.device, np.int32(slot), self.host[name])
        self.slot_virtual[slot] = self.virtual[name]
        self.loads += 1
