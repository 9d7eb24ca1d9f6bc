"""The serving engine: one frozen base, many adapters, continuous batching.

``max_batch`` rows share one preallocated KV cache [max_batch, max_len] per layer. A request
joins a free row between decode steps: its prompt is prefilled (left-padded to a multiple of
``bucket``, several new requests in one call, the batch padded to a power of two) and its keys
and values written into its row; from then on it advances one token per decode step with the
running rows, each row at its own cache slot (a per-row cache index) and position, applying its
own adapter from the bank. A finished row is free for the next request at once. So the compiled
programs are one decode step and one prefill per (batch, length) bucket, whatever the mix of
adapters and lengths: no recompile per request.

A soft prompt (prompt tuning) goes into the row at prefill, its virtual tokens right before
the row's tokens, so the row then decodes like any other.

Rows with ``temperature == 0`` decode greedily; the others sample with ``top_p`` from a key
derived from the request's ``seed`` and the token index only, so a seeded request gives the same
tokens whatever else shares the batch.

The engine is driven by :meth:`Engine.step` (one admission + prefill + decode round), from the
caller's thread (:meth:`Engine.generate`) or from a background thread (:meth:`Engine.start`,
what ``peftjax serve`` uses); requests, cancellations and adapter changes from other threads are
queued and applied between steps.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.generation import _filter_logits, _max_positions
from peftjax.models._layers import KVCache
from peftjax.serving._bank import (PROMPT, AdapterBank, bank_shardings, install, rows_use,
                                   select_layers)
from peftjax.tuners._prompt import embed_ids


class ServingError(ValueError):
    """A request or adapter the engine refuses (the message says why and what to do)."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request. ``adapter`` None is the base model; ``eos`` ends the sequence
    (the EOS token is the last of ``tokens``). ``on_token(request, token)`` and
    ``on_finish(request)`` are called from the engine's thread."""

    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    eos: tuple[int, ...] = ()
    on_token: Callable | None = None
    on_finish: Callable | None = None
    id: int = dataclasses.field(default_factory=itertools.count(1).__next__)
    # filled in by the engine
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None   # "stop" (EOS), "length", "cancelled", "error"
    error: str | None = None
    submitted: float = 0.0
    first_token: float | None = None
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _bucket(n: int, b: int) -> int:
    return -(-n // b) * b


def _pow2(n: int, cap: int) -> int:
    return min(1 << (n - 1).bit_length(), cap)


def _sample(logits_BV, temperature_B, top_p_B, seeds_B, steps_B):
    """Per row: greedy where temperature is 0, else a top-p sample with the row's own key."""
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    t = jnp.maximum(temperature_B, 1e-6)[:, None]
    p = top_p_B[:, None]
    filtered = _filter_logits(logits_BV, t, 0, p)  # sorts the vocabulary only if some p < 1
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_B, steps_B)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature_B > 0, sampled, greedy)


def _prefill(graphdef, state, bank, cache_k, cache_v, ids_PT, mask_PT, virtual_PT, rows_P,
             slots_P, temp_P, top_p_P, seeds_P):
    model = nnx.merge(graphdef, state)
    P, T = ids_PT.shape
    fresh = model.init_cache(P, T, cache_k[0].dtype)
    inputs = dict(input_ids=ids_PT)
    if virtual_PT is not None:  # each row's soft prompt in front of its tokens
        emb = embed_ids(model, ids_PT)
        table = bank[PROMPT]["embeds"][slots_P]                               # [P, V, E]
        v = jnp.take_along_axis(table, jnp.maximum(virtual_PT, 0)[..., None], axis=1)
        inputs = dict(inputs_embeds=jnp.where(virtual_PT[..., None] >= 0, v.astype(emb.dtype),
                                              emb))
    with rows_use(bank, slots_P):
        out = model(**inputs, attention_mask=mask_PT, cache=fresh, last_logits_only=True)
    r, s = rows_P[:, None], jnp.arange(T)[None, :]  # padding rows point past the cache: dropped
    cache_k = tuple(c.at[r, s].set(k, mode="drop") for c, k in zip(cache_k, out.cache.k))
    cache_v = tuple(c.at[r, s].set(v, mode="drop") for c, v in zip(cache_v, out.cache.v))
    tok = _sample(out.logits[:, -1], temp_P, top_p_P, seeds_P, jnp.zeros_like(seeds_P))
    return tok, cache_k, cache_v


def _decode(graphdef, state, bank, cache_k, cache_v, tok_B, start_B, length_B, slots_B, temp_B,
            top_p_B, seeds_B, steps_B):
    model = nnx.merge(graphdef, state)
    kv = jnp.arange(cache_k[0].shape[1])[None, :]
    mask = ((kv >= start_B[:, None]) & (kv <= length_B[:, None])).astype(jnp.int32)
    with rows_use(bank, slots_B):
        out = model(tok_B[:, None], attention_mask=mask, cache=KVCache(cache_k, cache_v, length_B),
                    last_logits_only=True)
    tok = _sample(out.logits[:, -1], temp_B, top_p_B, seeds_B, steps_B)
    return tok, out.cache.k, out.cache.v


class Engine:
    """Serves a causal LM with many adapters at once (see the module doc).

    Args:
      model: the base causal LM (plain, not a ``PeftModel``; it is not modified).
      adapters: ``{name: directory}`` (PEFT format) registered at once; they also set the
        defaults of ``targets`` and ``max_rank``.
      targets: the linear layers the bank covers, by PEFT's ``target_modules`` rules:
        ``"all-linear"``, names (``["q_proj", "v_proj"]``), paths or a regex. Default: the
        union of ``adapters``' targets, or all linear layers. An adapter registered later must
        target a subset.
      max_rank: the bank's rank (default: the largest of ``adapters``, or 16).
      bank_slots: adapters on the device at once, plus one for the base model; more may be
        registered (swapped in, least recently used out).
      max_batch: rows decoded together; max_len: cache slots per row (prompt, padded to
        ``bucket``, plus generated tokens).
      base_name: what the model was loaded from; an adapter whose ``base_model_name_or_path``
        names another base is refused (``check_base=False`` on :meth:`register` overrides).
      max_virtual_tokens: the longest soft prompt (prompt tuning) the bank holds (default: the
        longest of ``adapters``', 0 if none: then no prompt adapter can be registered).
      mesh: serve on this device mesh (``peftjax.train.make_mesh``): the base sharded as in
        training, the cache rows over data x fsdp.
    """

    def __init__(self, model: nnx.Module, *, adapters: dict[str, str] | None = None,
                 targets=None, max_rank: int | None = None, bank_slots: int = 8,
                 max_batch: int = 8, max_len: int = 512, bucket: int = 16,
                 base_name: str | None = None, cache_dtype=None, mesh=None,
                 max_virtual_tokens: int | None = None):
        from peftjax.models import task_of
        from peftjax.tuners import PeftModel

        if isinstance(model, PeftModel):
            raise ServingError("Engine serves a plain base model: pass peft_model.base_model "
                               "after unloading (peft_model.unload()) and register the adapters "
                               "by directory.")
        if task_of(model) != "causal_lm":
            raise ServingError(f"Engine serves causal LMs; got {type(model).__name__}.")
        limit = _max_positions(model.config)  # as generate: learned positions only
        if limit is not None and max_len > limit:
            raise ServingError(f"max_len {max_len} exceeds the model's {limit} positions.")
        if max_batch < 1 or bucket < 1:
            raise ServingError(f"max_batch and bucket must be >= 1; got {max_batch}, {bucket}")
        self.base, self.base_name = model, base_name
        self._lock = threading.Lock()  # the registry, read by other threads (the server)
        self.max_batch, self.max_len, self.bucket = max_batch, max_len, bucket
        staged = {}
        for n, d in (adapters or {}).items():
            self._check_base(n, d)
            staged[n] = self._stage(n, d)
        if targets is None:
            targets = (sorted({p for terms, _ in staged.values() for p in terms})
                       if staged else "all-linear")
        if max_rank is None:
            max_rank = max((t.rank for terms, _ in staged.values() for t in terms.values()),
                           default=0) or 16
        if max_virtual_tokens is None:
            max_virtual_tokens = max((len(p) for _, p in staged.values() if p is not None),
                                     default=0)
        serving = nnx.clone(model)  # shares the base's arrays; only the layer wrappers differ
        shapes, axes = install(serving, select_layers(serving, targets))
        self.mesh = mesh
        prompt_shape = ((max_virtual_tokens, model.config.hidden_size) if max_virtual_tokens
                        else None)
        self.bank = AdapterBank(
            shapes, slots=bank_slots, rank=max_rank, prompt_shape=prompt_shape,
            shardings=None if mesh is None else bank_shardings(shapes, axes, bank_slots,
                                                               max_rank, mesh, prompt_shape))
        for n, (terms, prompt) in staged.items():
            self.bank.add(n, terms, prompt)
        self.graphdef, self.state = nnx.split(serving)
        cache = serving.init_cache(max_batch, max_len, cache_dtype)
        self._k, self._v = cache.k, cache.v
        outs = None
        if mesh is None:  # committed to the device, as every later (jitted) value is
            self._k, self._v = jax.device_put((self._k, self._v), jax.devices()[0])
        else:  # the base as training shards it; cache rows over data x fsdp
            from jax.sharding import NamedSharding, PartitionSpec

            from peftjax.train._sharding import shard_state
            self.state = shard_state(self.state, mesh)
            B, _, K, _ = self._k[0].shape
            rows = mesh.shape["data"] * mesh.shape["fsdp"]
            c = NamedSharding(mesh, PartitionSpec(("data", "fsdp") if B % rows == 0 else None,
                                                  None, "tensor" if K % mesh.shape["tensor"] == 0
                                                  else None, None))
            self._k, self._v = jax.device_put((self._k, self._v), c)
            kv = tuple(c for _ in self._k)
            outs = (NamedSharding(mesh, PartitionSpec()), kv, kv)
        self.stats = collections.Counter()
        self._prefill_fn = self._compiled(_prefill, "prefill", outs)
        self._decode_fn = self._compiled(_decode, "decode", outs)
        B = max_batch
        self._rows: list[Request | None] = [None] * B
        self._tok, self._start, self._length = (np.zeros(B, np.int32) for _ in range(3))
        self._slot, self._steps, self._seed = (np.zeros(B, np.int32) for _ in range(3))
        self._temp, self._top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
        self._waiting: collections.deque[Request] = collections.deque()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._seeds = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _compiled(self, fn, name: str, out_shardings):
        """``fn`` jitted for this engine: its graph closed over (not a static argument hashed
        on every step), the cache donated, each trace counted in ``stats``."""
        def traced(*args):
            self.stats[f"{name}_compiles"] += 1  # runs once per trace, i.e. per compile
            return fn(self.graphdef, *args)
        return jax.jit(traced, donate_argnums=(2, 3), out_shardings=out_shardings)

    @property
    def compiles(self) -> dict[str, int]:
        """Programs compiled so far: one decode step, one prefill per (batch, length) bucket
        met; never one per request or adapter mix."""
        return {k: self.stats[f"{k}_compiles"] for k in ("prefill", "decode")}

    # ------------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return sorted(self.bank.host)

    def _stage(self, name: str, source) -> tuple:
        """An adapter's ``(layer terms, soft prompt or None)``, checked against the base (host
        work; no device bank)."""
        from peftjax.tuners import PeftModel, load_adapter

        if not isinstance(name, str) or not name or name != name.strip():
            raise ServingError(f"adapter names are non-empty strings without surrounding "
                               f"spaces; got {name!r}")
        if isinstance(source, PeftModel):
            peft = source
        else:
            peft = load_adapter(nnx.clone(self.base), os.fspath(source), name)
        config = peft.peft_config
        if peft.trained_base_entries():
            raise ServingError(f"adapter {name!r} trains base modules beside the adapter "
                               "(modules_to_save); a shared base cannot serve it per row. Merge "
                               "it (peftjax export) and serve the merged model.")
        try:
            terms, prompt = config.serving_terms(peft), config.serving_prompt(peft)
        except TypeError as e:
            raise ServingError(f"adapter {name!r}: {e}") from None
        if not terms and prompt is None:
            raise ServingError(f"adapter {name!r} adapts no linear layer of this model")
        return terms, None if prompt is None else np.asarray(prompt, np.float32)

    def _check_base(self, name: str, source) -> None:
        if self.base_name is None or not isinstance(source, (str, os.PathLike)):
            return
        from peftjax.tuners import read_config
        want = read_config(os.fspath(source)).base_model_name_or_path
        if want and _same_base(want) != _same_base(self.base_name):
            raise ServingError(f"adapter {name!r} was trained on {want!r}, not on the served "
                               f"base {self.base_name!r}; serve it over its own base (or pass "
                               "check_base=False if they are the same weights).")

    def register(self, name: str, source, *, check_base: bool = True) -> None:
        """Registers (or replaces) adapter ``name`` from a PEFT directory or a ``PeftModel``
        (its active adapter). Every stored key must land and fit the base; refused with the
        reason otherwise. Thread-safe: from another thread it waits for the engine."""
        if check_base:
            self._check_base(name, source)
        terms, prompt = self._stage(name, source)

        def add():
            try:
                with self._lock:
                    self.bank.add(name, terms, prompt)
            except ValueError as e:
                raise ServingError(str(e)) from None
        self._call(add)

    def unregister(self, name: str) -> None:
        """Removes adapter ``name``; waiting requests for it fail, running ones finish."""
        def remove():
            if name not in self.bank.host:
                raise ServingError(f"no adapter {name!r} (registered: {self.adapters})")
            with self._lock:
                self.bank.remove(name)
            for r in [r for r in self._waiting if r.adapter == name]:
                self._waiting.remove(r)
                self._finish(r, "error", f"adapter {name!r} was unloaded")
        self._call(remove)

    # ------------------------------------------------------------------------ requests
    def submit(self, request: Request) -> Request:
        """Queues ``request`` (checked here; refused with :class:`ServingError`)."""
        n = len(request.prompt)
        if n == 0:
            raise ServingError("the prompt is empty")
        if request.max_tokens < 1:
            raise ServingError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise ServingError(f"need temperature >= 0 and 0 < top_p <= 1; got "
                               f"{request.temperature}, {request.top_p}")
        if request.adapter is not None and request.adapter not in self.bank.host:
            raise ServingError(f"no adapter {request.adapter!r} (registered: {self.adapters})")
        V = self.bank.virtual.get(request.adapter, 0) if request.adapter is not None else 0
        padded = _bucket(n + V, self.bucket)
        if padded + request.max_tokens > self.max_len:
            raise ServingError(f"prompt ({n} tokens{f' + {V} virtual' if V else ''}, {padded} "
                               f"padded) + max_tokens ({request.max_tokens}) exceeds the "
                               f"engine's max_len {self.max_len}; shorten the prompt or lower "
                               "max_tokens.")
        vocab = self.base.config.vocab_size
        if min(request.prompt) < 0 or max(request.prompt) >= vocab:
            raise ServingError(f"prompt token ids must lie in [0, {vocab})")
        if request.seed is None:
            request.seed = int(self._seeds.integers(0, 2 ** 31 - 1))
        request.submitted = time.perf_counter()
        self._inbox.put(("request", request))
        self._wake.set()
        return request

    def cancel(self, request: Request) -> None:
        """Stops ``request`` (its ``finish_reason`` becomes "cancelled"); thread-safe."""
        self._inbox.put(("cancel", request))
        self._wake.set()

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._rows) or \
            not self._inbox.empty()

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Submits ``requests`` and runs the engine in this thread until they are done."""
        if self._thread is not None:
            raise ServingError("the engine runs in its background thread; submit() requests "
                               "and wait for them instead")
        for r in requests:
            self.submit(r)
        while any(not r.done for r in requests):
            self.step()
        return list(requests)

    # ------------------------------------------------------------------------ the loop
    def step(self) -> None:
        """One round: apply queued commands, admit waiting requests into free rows (prefill),
        and advance every running row by one token."""
        self._drain()
        admitted = self._admit()
        by_len = collections.defaultdict(list)
        for row in admitted:
            n = len(self._rows[row].prompt) + self.bank.slot_virtual[self._slot[row]]
            by_len[_bucket(int(n), self.bucket)].append(row)
        for T, rows in sorted(by_len.items()):
            self._prefill(T, rows)
        if any(r is not None for r in self._rows):
            self._decode()

    def _drain(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "request":
                if self._stopping:
                    self._finish(item, "error", "the server is shutting down")
                else:
                    self._waiting.append(item)
            elif kind == "cancel":
                if item in self._waiting:
                    self._waiting.remove(item)
                    self._finish(item, "cancelled")
                elif item in self._rows:
                    self._free(self._rows.index(item), "cancelled")
            else:  # a callable from another thread, with a slot for its outcome
                fn, box = item
                try:
                    box.append(("ok", fn()))
                except Exception as e:  # handed back to the calling thread
                    box.append(("error", e))
                box[0].set()

    def _call(self, fn):
        """Runs ``fn`` between steps (now, when no engine thread runs)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done = threading.Event()
        box = [done]
        self._inbox.put(("call", (fn, box)))
        self._wake.set()
        if not done.wait(timeout=600):
            raise ServingError("the engine did not answer within 600 s")
        status, value = box[1]
        if status == "error":
            raise value
        return value

    def _admit(self) -> list[int]:
        admitted = []
        free = [i for i, r in enumerate(self._rows) if r is None]
        blocked = []
        while free and self._waiting:
            req = self._waiting.popleft()
            if req.adapter is not None and req.adapter not in self.bank.host:
                self._finish(req, "error", f"adapter {req.adapter!r} was unloaded")
                continue
            slot = self.bank.acquire(req.adapter)
            if slot is None:  # every bank slot runs other adapters: wait for one to finish
                blocked.append(req)
                continue
            row = free.pop(0)
            self._rows[row] = req
            self._slot[row], self._seed[row] = slot, req.seed
            self._temp[row], self._top_p[row] = req.temperature, req.top_p
            admitted.append(row)
        self._waiting.extendleft(reversed(blocked))
        return admitted

    def _prefill(self, T: int, rows: list[int]) -> None:
        P = _pow2(len(rows), self.max_batch)
        for start in range(0, len(rows), P):
            chunk = rows[start:start + P]
            ids, mask = np.zeros((P, T), np.int32), np.zeros((P, T), np.int32)
            # soft prompts: which virtual token each slot holds (-1: a token or padding)
            virtual = (None if self.bank.prompt_shape is None else
                       np.full((P, T), -1, np.int32))
            rows_P = np.full(P, self.max_batch, np.int32)  # padding rows: written nowhere
            slots, temp, top_p, seeds = (np.zeros(P, np.int32), np.zeros(P, np.float32),
                                         np.ones(P, np.float32), np.zeros(P, np.int32))
            for i, row in enumerate(chunk):
                p, V = self._rows[row].prompt, int(self.bank.slot_virtual[self._slot[row]])
                ids[i, T - len(p):], mask[i, T - len(p) - V:] = p, 1
                if V:
                    virtual[i, T - len(p) - V:T - len(p)] = np.arange(V)
                rows_P[i], slots[i] = row, self._slot[row]
                temp[i], top_p[i], seeds[i] = self._temp[row], self._top_p[row], self._seed[row]
            tok, self._k, self._v = self._prefill_fn(
                self.state, self.bank.device, self._k, self._v, ids, mask, virtual, rows_P, slots,
                temp, top_p, seeds)
            tok = np.asarray(tok)
            self.stats["prefills"] += 1
            for i, row in enumerate(chunk):
                self._start[row], self._length[row] = T - int(mask[i].sum()), T
                self._emit(row, int(tok[i]))

    def _decode(self) -> None:
        tok, self._k, self._v = self._decode_fn(
            self.state, self.bank.device, self._k, self._v, self._tok, self._start, self._length,
            self._slot, self._temp, self._top_p, self._seed, self._steps)
        tok = np.asarray(tok)
        self.stats["decode_steps"] += 1
        for row, req in enumerate(self._rows):
            if req is not None:
                self._length[row] += 1
                self._emit(row, int(tok[row]))

    def _emit(self, row: int, token: int) -> None:
        """Row ``row`` produced ``token``: hand it out; end the request on EOS or length."""
        req = self._rows[row]
        if req.first_token is None:
            req.first_token = time.perf_counter()
        req.tokens.append(token)
        self.stats["tokens"] += 1
        self._tok[row] = token
        self._steps[row] = len(req.tokens)
        if req.on_token is not None:
            _quietly(req.on_token, req, token)
        if token in req.eos:
            self._free(row, "stop")
        elif len(req.tokens) >= req.max_tokens:
            self._free(row, "length")

    def _free(self, row: int, reason: str, error: str | None = None) -> None:
        req = self._rows[row]
        self._rows[row] = None
        self.bank.release(int(self._slot[row]))
        self._slot[row] = 0
        self._start[row] = self._length[row] = 0
        self._finish(req, reason, error)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error, req.finished = reason, error, time.perf_counter()
        self.stats[f"finished_{reason}"] += 1
        if req.on_finish is not None:
            _quietly(req.on_finish, req)

    # ------------------------------------------------------------------------ thread
    def start(self) -> None:
        """Runs the engine in a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="peftjax-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            if not self.busy:
                if self._stopping:
                    return
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, not the server
                self.stats["step_errors"] += 1
                for row, req in enumerate(self._rows):
                    if req is not None:
                        self._free(row, "error", f"{type(e).__name__}: {e}")

    def stop(self, *, drain: bool = True, timeout: float = 60.0) -> None:
        """Stops the background thread: new requests are refused; running (and, with
        ``drain``, waiting) requests finish first, the rest end with an error."""
        if self._thread is None:
            return
        def shut():
            self._stopping = True
            if not drain:
                while self._waiting:
                    self._finish(self._waiting.popleft(), "error", "the server is shutting down")
        self._call(shut)
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ServingError(f"the engine did not finish its requests within {timeout} s")
        self._thread = None


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # a consumer's callback must not stop the engine
        pass


def _same_base(name: str) -> str:
    path = os.path.expanduser(name)
    return os.path.realpath(path) if os.path.isdir(path) else name.rstrip("/")

