"""One device mesh with axes (data, fsdp, tensor) and logical-axis placement of parameters.

Every parameter carries logical axis names in its ``axes`` metadata (``embed``, ``heads``,
``mlp``, ``vocab``, ... and ``lora_rank`` for LoRA factors, whose other axis is the in/out axis of
the weight they adapt), so a rule table maps them onto mesh axes without touching the models:
``embed`` goes to ``fsdp`` (weights split across data-parallel devices, gathered per use) and
the head/MLP/vocab axes go to ``tensor`` (Megatron-style tensor parallelism). LoRA ``A`` [in, r]
and ``B`` [r, out] thereby sit on the same devices as the rows/columns of the weight they adapt.
A dimension that does not divide by its mesh axis is replicated instead. The batch is split
over ``data`` x ``fsdp``. The same jitted step runs on one device or many: XLA inserts the
collectives from the input shardings.

Example::

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    trainable, frozen = shard_state(trainable, mesh), shard_state(frozen, mesh)
    opt_state = optimizer.init(trainable)          # moments inherit the shardings
    trainable, opt_state, m = train_step(trainable, opt_state, frozen, shard_batch(b, mesh), rng)

Multi-host (TPU pods, multi-node GPU, several processes on one machine): every process runs the
same program with ``MeshConfig(distributed=True)``. :func:`initialize_distributed` (called by
``peftjax train`` first thing, or by :func:`make_mesh`, before any other JAX call) joins the
processes through ``jax.distributed``: the coordinator address, process count and id come from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (``peftjax launch`` sets
them) or from the cluster (Cloud TPU, SLURM, ...). The mesh then spans every process's devices;
parameters are placed from values every process holds, and each process feeds only its own rows
of the global batch (:func:`process_rows`, ``shard_batch(local, mesh, global_rows=B)``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from peftjax.config import MeshConfig  # noqa: F401  (re-exported)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (None: replicated)
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "qkv": "tensor", "embed_out": "tensor", "head_dim": None, "lora_rank": None, "labels": None,
    "positions": None, "types": None,
}


class DistributedSetupError(RuntimeError):
    """A multi-process launch whose settings cannot work (missing or bad environment variables,
    an unreachable coordinator, JAX already started)."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"{name}={value!r} is not an integer") from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once a TCP connection to ``address`` succeeds; raises after ``timeout_s``. (JAX
    aborts the whole process when registration times out, with no Python error to catch, so
    an unreachable coordinator is detected here first.)"""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedSetupError(
                    f"could not reach the coordinator at {address} within {timeout_s:.0f} s "
                    f"({e}); process 0 hosts it: start it (peftjax launch starts all processes), "
                    "and check JAX_COORDINATOR_ADDRESS names process 0's host and a free port"
                    ) from None
            time.sleep(0.2)


def initialize_distributed(*, init_timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
    """Joins this process to a multi-process run (``jax.distributed.initialize``), once; must
    come before any other JAX call in the process.

    With ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` set, those are used (process 0 serves the coordinator there); without
    them, JAX detects the cluster (Cloud TPU, SLURM, Open MPI, ...). ``init_timeout_s``: how long
    to wait for every process to join; ``heartbeat_timeout_s``: after a process stops (killed,
    crashed), the others stop within about this time instead of waiting forever. On CPU the
    processes' collectives go through gloo."""
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    given = (address, n, pid) != (None, None, None)
    if given:
        missing = [name for name, v in (("JAX_COORDINATOR_ADDRESS", address),
                                        ("JAX_NUM_PROCESSES", n), ("JAX_PROCESS_ID", pid))
                   if v is None]
        if missing:
            raise DistributedSetupError(
                f"multi-process launch: {', '.join(missing)} not set; set all three of "
                "JAX_COORDINATOR_ADDRESS=host:port (process 0), JAX_NUM_PROCESSES=N and "
                "JAX_PROCESS_ID=0..N-1 on every process, or use peftjax launch -n N -- train "
                "CONFIG")
        if n < 1 or not 0 <= pid < n:
            raise DistributedSetupError(f"JAX_PROCESS_ID={pid} with JAX_NUM_PROCESSES={n}: the "
                                        "id must be in 0..N-1 and N >= 1")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedSetupError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port")
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        raise DistributedSetupError(
            "mesh.distributed=true: JAX is already running in this process, and jax.distributed "
            "must join the processes before any JAX call. Call peftjax.train."
            "initialize_distributed() at the top of the script (peftjax train does it first).")
    timeouts = dict(initialization_timeout=init_timeout_s,
                    heartbeat_timeout_seconds=heartbeat_timeout_s)
    if not given:  # the cluster's own variables (Cloud TPU, SLURM, Open MPI, ...)
        try:
            jax.distributed.initialize(**timeouts)
        except (ValueError, RuntimeError) as e:
            raise DistributedSetupError(
                f"mesh.distributed=true, but JAX found no cluster to join ({e}). Launch the "
                "processes with peftjax launch -n N -- train CONFIG, or set "
                "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on each; for one "
                "process, set mesh.distributed=false") from None
        return
    if pid == 0:  # the coordinator binds this port: say so if it cannot
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", int(port)))
            except OSError as e:
                raise DistributedSetupError(
                    f"process 0 cannot serve the coordinator on port {port} ({e}); choose a "
                    "free port in JAX_COORDINATOR_ADDRESS") from None
    else:
        _wait_for_coordinator(address, init_timeout_s)
    # (if not all join in time, JAX aborts the process with DEADLINE_EXCEEDED: say first what
    # it waits for)
    print(f"peftjax: process {pid} of {n} joining at {address} (waiting up to {init_timeout_s} s "
          "for all)", file=sys.stderr, flush=True)
    jax.distributed.initialize(address, n, pid, **timeouts)


def is_primary() -> bool:
    """True in the process that writes a run's files (process 0; always, with one process)."""
    return jax.process_index() == 0


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all hosts)."""
    cfg = cfg or MeshConfig()
    if cfg.distributed:
        initialize_distributed(init_timeout_s=cfg.init_timeout_s,
                               heartbeat_timeout_s=cfg.heartbeat_timeout_s)
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into a mesh whose fixed axes "
                             f"take {known}; change the sizes in MeshConfig")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{int(np.prod(sizes))} devices, there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def partition_spec(axes, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """Mesh axes for an array with logical ``axes``; a mesh axis is used at most once and only
    where it divides the dimension."""
    rules = DEFAULT_RULES if rules is None else {**DEFAULT_RULES, **rules}
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    used, spec = set(), []
    for name, dim in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}; add it to rules "
                             f"(known: {', '.join(sorted(rules))})")
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """A pytree of ``NamedSharding`` matching ``state`` (one per variable, from its ``axes``)."""
    def one(var):
        value = var[...]
        return NamedSharding(mesh, partition_spec(var.get_metadata().get("axes"), value.shape,
                                                  mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, rules=None) -> nnx.State:
    """Places every array of ``state`` on the mesh by its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def replicate_single(tree, mesh: Mesh):
    """``tree`` with every array that lives on one device replicated over ``mesh`` (e.g. the
    optimizer's step count, which ``optimizer.init`` puts on the default device: restored
    into that placement it would not meet the sharded parameters in one computation)."""
    if mesh.size == 1:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) == 1:
            return jax.device_put(x, replicated)
        return x
    return jax.tree.map(place, tree)


def tracing_mesh(mesh: Mesh):
    """The context steps are traced in: ``jax.set_mesh(mesh)`` when the mesh has several
    devices (a fused attention kernel runs under ``shard_map`` over it: the splash kernel on
    TPUs), nothing otherwise."""
    return jax.set_mesh(mesh) if mesh.size > 1 else contextlib.nullcontext()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a ``global_rows``-row batch that this process's devices hold (all of them
    with one process): what it feeds to ``shard_batch(..., global_rows=...)``."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_rows % n:
        raise ValueError(f"a batch of {global_rows} rows does not divide over data x fsdp = {n} "
                         "devices; change train.batch_size or the mesh")
    index = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    spans = sorted({(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
                    for i in index.values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError("this process's devices hold rows that are not contiguous in the "
                         "mesh; build the mesh from jax.devices() in its own order")
    return slice(start, stop)


def shard_batch(batch: dict, mesh: Mesh, *, global_rows: int | None = None) -> dict:
    """Splits every array of ``batch`` along its first (batch) axis over data x fsdp.

    ``batch`` is the whole batch (the same in every process), or, with ``global_rows``, only
    this process's rows of a batch of that many rows (:func:`process_rows`): the way each host
    feeds its share in a multi-process run."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    sharding = batch_sharding(mesh)
    if global_rows is not None and jax.process_count() > 1:
        rows = process_rows(mesh, global_rows)
        out = {}
        for key, value in batch.items():
            if np.shape(value)[0] != rows.stop - rows.start:
                raise ValueError(f"batch[{key!r}] has {np.shape(value)[0]} rows; this process "
                                 f"feeds rows {rows.start}..{rows.stop - 1} of {global_rows}")
            out[key] = jax.make_array_from_process_local_data(
                sharding, np.asarray(value), (global_rows,) + np.shape(value)[1:])
        return out
    for key, value in batch.items():
        if np.shape(value)[0] % n:
            raise ValueError(f"batch[{key!r}] has {np.shape(value)[0]} rows, not divisible by "
                             f"data x fsdp = {n} devices")
    return jax.device_put(batch, sharding)


def to_host(tree):
    """Numpy copies of a pytree of arrays, gathered from every process where an array is
    spread over several (every process must call it then)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true in any process (a collective with several processes: every
    process must call it at the same point)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())
