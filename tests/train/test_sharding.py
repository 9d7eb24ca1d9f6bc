"""The same train step on 1 device and on 8 simulated CPU devices (meshes (8,1,1), (2,4,1),
(2,2,2)): same losses and adapters within 1e-5 (float32), frozen weights really split under
fsdp/tensor. Runs in a subprocess because the device count is fixed when jax starts.

The optimizer is SGD with momentum, whose update is linear in the gradient, so the comparison
measures the distributed gradients. (With Adam, a gradient component that is rounding noise,
~1e-9, still moves its parameter by about the learning rate: the update is g / (|g| + eps).
Measured: 1.1e-2 adapter difference after 3 AdamW steps at lr 1e-2, with losses still within
3e-5 — Adam's sensitivity, not the mesh's.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import on_eight_devices

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _run(path: str, out: str) -> None:
    """Body of the subprocess: train 3 steps per mesh, write what the test checks to ``out``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from peftjax import LoraConfig, get_peft_model
    from peftjax.models import from_pretrained
    import optax

    from peftjax.train import (MeshConfig, make_mesh, make_train_step, shard_batch, shard_state,
                               split_model)
    from tests.conftest import batch

    assert len(jax.devices()) == 8, jax.devices()
    ids, mask = batch(lengths=(12, 9, 7, 12, 10, 5, 12, 8), seed=1)
    data = {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}
    results = {}
    for shape in [(1, 1, 1)] + MESHES:
        devices = jax.devices()[:int(np.prod(shape))]
        mesh = make_mesh(MeshConfig(*shape), devices)
        model = get_peft_model(from_pretrained(path, progress=False),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                               rngs=nnx.Rngs(0))
        graphdef, trainable, frozen = split_model(model)
        trainable, frozen = shard_state(trainable, mesh), shard_state(frozen, mesh)
        before = {p: v[...].sharding for p, v in nnx.to_flat_state(trainable)}
        optimizer = optax.sgd(0.5, momentum=0.9)
        opt_state = optimizer.init(trainable)
        step = make_train_step(graphdef, optimizer, task="causal_lm")
        losses = []
        for i in range(3):
            trainable, opt_state, m = step(trainable, opt_state, frozen, shard_batch(
                {k: jnp.asarray(v) for k, v in data.items()}, mesh), None)
            losses.append(float(m["loss"]))
        attn = "base_model", "model", "layers", 0, "self_attn", "q_proj"
        lora = attn + ("lora", "default")
        flat_f = dict(nnx.to_flat_state(frozen))
        flat_t = dict(nnx.to_flat_state(trainable))
        results[str(shape)] = {
            "losses": losses,
            "adapters": {"/".join(map(str, p)): np.asarray(v[...]).tolist() for p, v in flat_t.items()},
            "kernel_shard": flat_f[attn + ("kernel",)][...].sharding.shard_shape((64, 64)),
            "lora_a_shard": flat_t[lora + ("lora_A",)][...].sharding.shard_shape((64, 4)),
            "lora_b_shard": flat_t[lora + ("lora_B",)][...].sharding.shard_shape((4, 64)),
            "shardings_kept": all(flat_t[p][...].sharding.is_equivalent_to(s, flat_t[p][...].ndim)
                                  for p, s in before.items()),
        }
    with open(out, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def sharded(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded") / "results.json")
    on_eight_devices(f"from tests.train.test_sharding import _run; "
                     f"_run({tiny_dir('llama')!r}, {out!r})")
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_matches_one_device(sharded, shape):
    one, many = sharded[str((1, 1, 1))], sharded[str(shape)]
    loss_diff = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
    adapter_diff = max(np.abs(np.asarray(one["adapters"][k]) - np.asarray(many["adapters"][k])).max()
                       for k in one["adapters"])
    print(f"mesh {shape}: losses {many['losses']} vs {one['losses']}, max |loss diff| {loss_diff:.1e}, "
          f"max |adapter diff| {adapter_diff:.1e}")
    assert one["losses"][-1] < one["losses"][0]
    assert loss_diff <= 1e-5 and adapter_diff <= 1e-5
    assert many["shardings_kept"]  # the step returns adapters placed as they came in


def test_fsdp_and_tensor_split_frozen_weights(sharded):
    # q_proj kernel [embed=64, heads=64]: embed over fsdp, heads over tensor
    assert sharded[str((8, 1, 1))]["kernel_shard"] == [64, 64]      # pure data parallel
    assert sharded[str((2, 4, 1))]["kernel_shard"] == [16, 64]      # fsdp=4 splits embed
    assert sharded[str((2, 2, 2))]["kernel_shard"] == [32, 32]      # fsdp=2 x tensor=2
    # LoRA A [embed, r] and B [r, heads] follow the weight they adapt
    assert sharded[str((2, 2, 2))]["lora_a_shard"] == [32, 4]
    assert sharded[str((2, 2, 2))]["lora_b_shard"] == [4, 32]


def test_mesh_config_errors():
    from peftjax.train import MeshConfig, make_mesh, partition_spec
    import jax
    with pytest.raises(ValueError, match="needs 4 devices, there are 1"):
        make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:1])
    with pytest.raises(ValueError, match="at most one -1"):
        MeshConfig(data=-1, fsdp=-1)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'experts'"):
        partition_spec(("experts", "embed"), (4, 8), mesh)
