"""The contract every registered PEFT method keeps, on a tiny random Llama: outputs at init
(identity where the method defines it), save -> load gives identical outputs, the loss falls
through the standard (jitted) train step, frozen weights stay bit-identical, the optimizer
holds state only for the method's leaves, remat ``full`` (with the blocks scanned too) equals
``none``, and 8 simulated devices equal one. A method joins by being registered and having an entry in ``CONTRACT``."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from peftjax import (AdaptionPromptConfig, BottleneckConfig, IA3Config, LoraConfig, PeftModel,
                     PrefixTuningConfig, PromptTuningConfig, TiedLoraConfig, VeraConfig,
                     get_peft_model)
from peftjax.models import _remat, from_pretrained
from peftjax.train import (OptimizerConfig, ScanLayout, make_optimizer, make_train_step,
                           set_remat, set_scan_layers, split_model)
from peftjax.tuners import AdapterParam, registered
from tests.conftest import batch, on_eight_devices

# method -> (config, outputs right after injection: True = the base model's exactly,
# False = different, a float = the base model's within that tolerance)
CONTRACT = {
    "lora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), True),
    "prompt_tuning": (PromptTuningConfig(num_virtual_tokens=4), False),
    "prefix_tuning": (PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                         encoder_hidden_size=16), False),
    # zero gates at init: the gates are all that gets a gradient in the first step
    "adaption_prompt": (AdaptionPromptConfig(adapter_len=3, adapter_layers=2), True),
    "ia3": (IA3Config(), True),  # PEFT's default targets; vectors start at one
    "vera": (VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]), True),
    "bottleneck": (BottleneckConfig(architecture="houlsby", reduction_factor=16), True),
    "tied_lora": (TiedLoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), True),
    # variants of a method: "method+variant"
    "lora+dora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_dora=True), 2e-5),  # m / n is 1 up to float32 rounding
    "lora+fa": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           lora_fa=True), True),  # LoRA-FA: A frozen, only B trains
    "lora+qalora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               use_qalora=True, qalora_group_size=16), True),  # pooled input
}
IDS, MASK = batch(lengths=(12, 9, 7, 12, 10, 5, 12, 8), seed=1)
DATA = {"input_ids": IDS, "attention_mask": MASK, "labels": np.where(MASK == 1, IDS, -100)}


def test_every_registered_method_is_under_contract():
    assert sorted(registered()) == sorted({k.split("+")[0] for k in CONTRACT})


def _logits(model):
    out = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, jnp.asarray(IDS),
                                                          jnp.asarray(MASK))
    return np.asarray(out.logits)[MASK == 1]


def _train(model, steps=4, remat="none", optimizer=None, stacked=False):
    """``stacked``: the frozen weights of scanned blocks held stacked (``ScanLayout``), as
    ``train.scan_layers`` runs hold them."""
    set_remat(model, remat)
    graphdef, trainable, frozen = split_model(model)
    optimizer = optimizer or make_optimizer(OptimizerConfig(learning_rate=1e-2))
    opt_state = optimizer.init(trainable)
    data = {k: jnp.asarray(v) for k, v in DATA.items()}
    layout = ScanLayout.find(graphdef, trainable, frozen, data, task="causal_lm") if stacked \
        else None
    step = make_train_step(graphdef, optimizer, task="causal_lm", layout=layout)
    held = layout.stack(frozen) if stacked else frozen
    losses = []
    for _ in range(steps):
        trainable, opt_state, metrics = step(trainable, opt_state, held, data, None)
        losses.append(float(metrics["loss"]))
    nnx.update(model, trainable)
    return losses, trainable, frozen, opt_state


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("method", list(CONTRACT))
def test_contract(tiny_dir, tmp_path, method):
    config, identity = CONTRACT[method]
    path = tiny_dir("llama")
    base_logits = _logits(from_pretrained(path, progress=False))
    model = get_peft_model(from_pretrained(path, progress=False), config, rngs=nnx.Rngs(0))
    init_diff = np.abs(_logits(model) - base_logits).max()
    if identity is True:  # exactly the base model
        assert init_diff == 0, init_diff
    elif identity is False:  # the method changes the outputs at once (virtual tokens)
        assert init_diff > 1e-3, init_diff
    else:  # the base model up to float32 rounding
        assert init_diff <= identity, init_diff
    frozen_before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    losses, trainable, frozen, opt_state = _train(model)
    print(f"{method}: losses {np.round(losses, 4).tolist()}")
    assert losses[-1] < losses[0] - 1e-3
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # frozen: bit-identical
        assert np.array_equal(np.asarray(v[...]), frozen_before[p]), p
    arrays = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert _nbytes(arrays) == 2 * _nbytes(trainable)  # AdamW moments, trainable leaves only
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    assert n_trainable < 0.05 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))

    trained = _logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    again = PeftModel.from_pretrained(from_pretrained(path, progress=False),
                                      str(tmp_path / "adapter"))
    assert type(again.peft_config) is type(config)
    np.testing.assert_array_equal(_logits(again), trained)


@pytest.mark.parametrize("method", list(CONTRACT))
def test_remat_full_and_scanned_blocks_equal_none(tiny_dir, method, monkeypatch):
    """Remat ``full``, and full remat with the blocks scanned (``train.scan_layers``: the
    frozen weights held stacked, as runs hold them), train as the plain step does."""
    config, _ = CONTRACT[method]
    scanned = []
    repeats = _remat._repeats
    monkeypatch.setattr(_remat, "_repeats", lambda keys: scanned.append(repeats(keys))
                        or scanned[-1])
    runs = []
    for remat, scan in (("none", False), ("full", False), ("full", True)):
        model = get_peft_model(from_pretrained(tiny_dir("llama"), progress=False), config,
                               rngs=nnx.Rngs(0))
        if scan:
            set_scan_layers(model)
        # SGD: linear in the gradient, so the comparison measures the gradients (AdamW
        # amplifies rounding noise in a near-zero gradient component to the learning rate)
        losses, trainable, _, _ = _train(model, steps=2, remat=remat,
                                         optimizer=optax.sgd(0.5, momentum=0.9), stacked=scan)
        runs.append((losses, jax.tree.leaves(trainable)))
    # at least two blocks ran as one scan
    assert any(count >= 2 for segments in scanned for _, _, count in segments), scanned
    for name, run in (("remat full", runs[1]), ("scanned", runs[2])):
        # float32 rounding of the recomputed forward, relative to the values' size
        leaf_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(runs[0][1], run[1]))
        print(f"{method}: {name} vs none: losses {runs[0][0]} / {run[0]}, "
              f"largest leaf difference {leaf_diff:.1e}")
        np.testing.assert_allclose(run[0], runs[0][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(runs[0][1], run[1]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def _randomize(model, adapter: str, seed: int) -> None:
    """Every leaf of ``adapter`` set to random values (so that each adapter changes outputs)."""
    rng = np.random.default_rng(seed)
    for _, v in nnx.to_flat_state(nnx.state(model, AdapterParam)):
        if v.get_metadata()["adapter"] == adapter:
            v[...] = jnp.asarray(rng.normal(0, 0.5, v[...].shape), v[...].dtype)


@pytest.mark.parametrize("method", list(CONTRACT))
def test_named_adapters(tiny_dir, tmp_path, method):
    """A second adapter of the method: adding it changes nothing until ``set_adapter``; then the
    model equals that adapter alone (loaded from its file, written by ``save_pretrained`` into a
    subdirectory as PEFT does); ``disable_adapter`` gives the base model; only the active
    adapter trains; ``delete_adapter`` brings the first back."""
    config, _ = CONTRACT[method]
    path = tiny_dir("llama")
    base_logits = _logits(from_pretrained(path, progress=False))
    model = get_peft_model(from_pretrained(path, progress=False), config, rngs=nnx.Rngs(0))
    _randomize(model, "default", 1)
    first = _logits(model)
    model.add_adapter("other", config)
    _randomize(model, "other", 2)
    assert model.active_adapters == ["default"]
    np.testing.assert_array_equal(_logits(model), first)
    model.set_adapter("other")
    second = _logits(model)
    assert np.abs(second - first).max() > 1e-2
    with model.disable_adapter():
        np.testing.assert_array_equal(_logits(model), base_logits)
    np.testing.assert_array_equal(_logits(model), second)

    mask = dict(nnx.to_flat_state(model.trainable_mask()))  # exactly the active adapter's
    leaves = list(nnx.to_flat_state(nnx.state(model, AdapterParam)))
    assert {p for p, on in mask.items() if on} == {
        p for p, v in leaves if v.get_metadata()["adapter"] == "other"
        and not v.get_metadata().get("frozen", False)}

    model.save_pretrained(str(tmp_path))
    alone = PeftModel.from_pretrained(from_pretrained(path, progress=False),
                                      str(tmp_path / "other"))
    np.testing.assert_allclose(_logits(alone), second, rtol=0, atol=1e-6)
    both = PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path))
    both.load_adapter(str(tmp_path / "other"), "other")
    np.testing.assert_allclose(_logits(both), first, rtol=0, atol=1e-6)
    both.set_adapter("other")
    np.testing.assert_allclose(_logits(both), second, rtol=0, atol=1e-6)

    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and list(model.peft_configs) == ["default"]
    np.testing.assert_array_equal(_logits(model), first)


def _run_meshes(path: str, out: str) -> None:
    """Subprocess body: 3 SGD steps of every method on 1 device and on a (2, 2, 2) mesh (LoRA
    also with its blocks scanned over the sharded stacked weights)."""
    from peftjax.train import MeshConfig, make_mesh, shard_batch, shard_state
    assert len(jax.devices()) == 8, jax.devices()
    results = {}
    for method, (config, _) in CONTRACT.items():
        for shape, scan in [((1, 1, 1), False), ((2, 2, 2), False)] + (
                [((2, 2, 2), True)] if method == "lora" else []):
            mesh = make_mesh(MeshConfig(*shape), jax.devices()[:int(np.prod(shape))])
            model = get_peft_model(from_pretrained(path, progress=False), config,
                                   rngs=nnx.Rngs(0))
            if scan:
                set_scan_layers(model)
            graphdef, trainable, frozen = split_model(model)
            trainable, frozen = shard_state(trainable, mesh), shard_state(frozen, mesh)
            optimizer = optax.sgd(0.5, momentum=0.9)  # linear in the gradient: see test_sharding
            opt_state = optimizer.init(trainable)
            layout = None
            if scan:  # the scanned blocks' weights held stacked, sharded as each block's
                layout = ScanLayout.find(graphdef, trainable, frozen,
                                         {k: jnp.asarray(v) for k, v in DATA.items()},
                                         task="causal_lm")
                frozen = layout.stack(frozen, delete=True)
                assert layout.groups and all(
                    s.sharding.spec[0] is None and s.sharding.mesh.shape == mesh.shape
                    for s in frozen["stacks"])
            step = make_train_step(graphdef, optimizer, task="causal_lm", layout=layout)
            losses = []
            for _ in range(3):
                trainable, opt_state, m = step(trainable, opt_state, frozen, shard_batch(
                    {k: jnp.asarray(v) for k, v in DATA.items()}, mesh), None)
                losses.append(float(m["loss"]))
            results[f"{method} {shape}" + (" scanned" if scan else "")] = {
                "losses": losses,
                "leaves": [np.asarray(x).tolist() for x in jax.tree.leaves(trainable)]}
    with open(out, "w") as f:
        json.dump(results, f)


def test_eight_devices_equal_one(tiny_dir, tmp_path):
    out = str(tmp_path / "meshes.json")
    on_eight_devices("from tests.tuners.test_contract import _run_meshes; "
                     f"_run_meshes({tiny_dir('llama')!r}, {out!r})")
    results = json.load(open(out))
    for method in [*CONTRACT, "lora scanned"]:
        base = method.removesuffix(" scanned")
        one = results[f"{base} (1, 1, 1)"]
        many = results[f"{base} (2, 2, 2)" + method[len(base):]]
        loss_diff = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
        leaf_diff = max(np.abs(np.asarray(a) - np.asarray(b)).max()
                        for a, b in zip(one["leaves"], many["leaves"]))
        print(f"{method}: mesh (2,2,2) vs 1 device: loss {loss_diff:.1e}, adapter {leaf_diff:.1e}")
        assert one["losses"][-1] < one["losses"][0]
        assert loss_diff <= 1e-5 and leaf_diff <= 1e-5, method


@pytest.mark.parametrize("method", list(CONTRACT))
def test_generate_command_with_the_adapter(tiny_llama_with_real_tokenizer, tmp_path, capsys,
                                           method):
    """``peftjax generate --model M --adapter DIR`` loads every method's adapter and prints
    what ``peftjax.generate`` gives for the same adapter (greedy, a real tokenizer)."""
    import peftjax
    from peftjax.cli import main
    path = tiny_llama_with_real_tokenizer
    config, _ = CONTRACT[method]
    model = get_peft_model(from_pretrained(path, progress=False), config, rngs=nnx.Rngs(0))
    if method == "adaption_prompt":  # open the gates, as training would
        for p in model.added["adaption_prompts"]:
            p.adaption_gate[...] = jnp.ones((1,), jnp.float32)
    model.save_pretrained(str(tmp_path / "adapter"))
    prompts = ["The movie was", "Review: dull. Sentiment:"]
    want = peftjax.generate(model, prompts, tokenizer=peftjax.load_tokenizer(path),
                            max_new_tokens=5, temperature=0.0).texts
    capsys.readouterr()
    assert main(["generate", "--model", path, "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", "5", *prompts]) == 0
    printed = capsys.readouterr().out
    assert printed == "".join(f"### {p}\n{t}\n\n" for p, t in zip(prompts, want)), printed
