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

Multi-host (TPU pods, multi-node GPU): set ``MeshConfig(distributed=True)``; :func:`make_mesh`
then calls ``jax.distributed.initialize()`` (which reads the coordinator address, process count
and id from the cluster environment: Cloud TPU, SLURM, or ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) before it counts devices, and the mesh spans
every process's devices. Each process then feeds its own slice of the global batch.
"""

from __future__ import annotations

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


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` once per process (multi-host runs)."""
    if not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all hosts)."""
    cfg = cfg or MeshConfig()
    if cfg.distributed:
        initialize_distributed()
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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Splits every array of ``batch`` along its first (batch) axis over data x fsdp."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    for key, value in batch.items():
        if np.shape(value)[0] % n:
            raise ValueError(f"batch[{key!r}] has {np.shape(value)[0]} rows, not divisible by "
                             f"data x fsdp = {n} devices")
    return jax.device_put(batch, batch_sharding(mesh))
