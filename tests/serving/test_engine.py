"""The serving engine: every row of a mixed, continuously batched run equals what its adapter
alone gives with ``peftjax.generate`` (greedy, token for token), on one device and on 8."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from peftjax.generation import generate
from peftjax.models import from_pretrained
from peftjax.serving import AdapterBank, Engine, Request, ServingError
from peftjax.tuners import (IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                            get_peft_model, load_adapter)
from tests.conftest import on_eight_devices

MAX_TOKENS = 10


def adapter_configs(arch: str) -> dict:
    """Adapters that differ in every way the bank must handle: rank (2..6), alpha, rsLoRA,
    rank/alpha patterns, target sets, DoRA, (IA)³ on outputs and on a feed-forward input, and a
    soft prompt (prompt tuning, no layer changed)."""
    if arch == "gpt2":
        fan = dict(fan_in_fan_out=True)
        return {
            "qkv2": LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], **fan,
                               init_lora_weights=False),
            "all6": LoraConfig(r=6, lora_alpha=3, use_rslora=True,
                               target_modules=["c_attn", "c_proj", "c_fc"],
                               rank_pattern={"c_fc": 3}, **fan, init_lora_weights=False),
            "dora": LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["c_proj"],
                               **fan, init_lora_weights=False),
            "ia3": IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                             feedforward_modules=["mlp.c_proj"], **fan,
                             init_ia3_weights=False),
            "prompt": PromptTuningConfig(num_virtual_tokens=4),
        }
    return {
        "qv2": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False),
        "all6": LoraConfig(r=6, lora_alpha=3, use_rslora=True, target_modules="all-linear",
                           rank_pattern={"down_proj": 3}, alpha_pattern={"o_proj": 9},
                           init_lora_weights=False),
        "dora": LoraConfig(r=3, lora_alpha=6, use_dora=True,
                           target_modules=["k_proj", "o_proj", "up_proj"],
                           init_lora_weights=False),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"], init_ia3_weights=False),
        "prompt": PromptTuningConfig(num_virtual_tokens=5),
    }


def save_adapters(base, configs: dict, root) -> dict:
    dirs = {}
    for i, (name, cfg) in enumerate(configs.items()):
        pm = get_peft_model(nnx.clone(base), cfg, rngs=nnx.Rngs(i + 1))
        pm.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


def mixed_requests(names: list, vocab: int, n: int = 12, seed: int = 0) -> list[Request]:
    """Prompts of 3..26 tokens (two length buckets with the soft prompt), every adapter and the
    base, different max_tokens, an EOS id."""
    rs = np.random.RandomState(seed)
    return [Request(prompt=rs.randint(3, vocab, rs.randint(3, 27)).tolist(),
                    adapter=names[i % len(names)], max_tokens=MAX_TOKENS - (i % 3) * 3,
                    eos=(5,)) for i in range(n)]


def references(base, dirs: dict, reqs: list[Request], *, as_base: bool = False) -> list:
    """Each request's tokens from ``peftjax.generate`` with its adapter alone (``as_base``: with
    no adapter), one batch per adapter (greedy: the first n of more tokens are the n tokens).
    A soft prompt's requests run one at a time without padding: ``generate`` puts the virtual
    tokens before the left padding (as PEFT does), so a sliding window, which counts cache
    slots, would see fewer of them than in the engine, whose rows keep them next to the
    tokens."""
    out = {}
    for name in {None if as_base else r.adapter for r in reqs}:
        rs = [r for r in reqs if as_base or r.adapter == name]
        model = base if name is None else load_adapter(nnx.clone(base), dirs[name], name)
        kw = dict(max_new_tokens=MAX_TOKENS, eos_token_id=5, pad_token_id=0)
        if name == "prompt":
            seqs = [generate(model, [r.prompt], bucket=None, **kw).sequences()[0] for r in rs]
        else:
            seqs = generate(model, [r.prompt for r in rs], bucket=48, **kw).sequences()
        out.update({r.id: seq[:r.max_tokens] for r, seq in zip(rs, seqs)})
    return [out[r.id] for r in reqs]


def run_mixed(model_dir: str, root, mesh=None, n: int = 12,
              skip=()) -> tuple[list[Request], dict, Engine]:
    arch = "gpt2" if "gpt2" in model_dir else "llama"
    base = from_pretrained(model_dir, progress=False)
    dirs = save_adapters(base, {k: v for k, v in adapter_configs(arch).items() if k not in skip},
                         root)
    # 4 rows for 12 requests (they join as others finish) and 2 device slots for 5 adapters
    # (swapped in and out as requests need them)
    engine = Engine(base, adapters=dirs, max_batch=4, max_len=64, bank_slots=3, bucket=16,
                    mesh=mesh)
    reqs = mixed_requests([None] + list(dirs), base.config.vocab_size, n=n)
    engine.generate(reqs)
    return reqs, dirs, engine


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])
def test_mixed_batch_equals_each_adapter_alone(tiny_dir, tmp_path, arch):
    """Mistral (GQA, a sliding window shorter than the sequences) and GPT-2 (Conv1D, learned
    positions): LoRA of ranks 2..6 with rsLoRA and patterns, DoRA, (IA)³, a soft prompt and the
    base in one run, with rows joining and leaving and adapters swapped through a bank smaller
    than them."""
    reqs, dirs, engine = run_mixed(tiny_dir(arch), tmp_path)
    base = from_pretrained(tiny_dir(arch), progress=False)
    for r, want in zip(reqs, references(base, dirs, reqs)):
        assert r.tokens == want, (r.adapter, r.tokens, want)
        assert r.finish_reason == ("stop" if want[-1] == 5 else "length")
    # continuous batching and swapping happened: more requests than rows, more adapters than
    # device slots; one decode program for every mix
    assert engine.stats["prefills"] >= 3 and engine.bank.loads > len(dirs)
    assert engine.compiles["decode"] == 1 and engine.compiles["prefill"] <= 6
    # the adapters matter: each changes its requests' tokens against the base (except Mistral's
    # soft prompt: its 5-slot window over 3 layers lets no token past the 15th see it)
    plain = references(base, dirs, reqs, as_base=True)
    for name in [n for n in dirs if not (arch == "mistral" and n == "prompt")]:
        assert any(r.tokens != p for r, p in zip(reqs, plain) if r.adapter == name), name


def _mesh_run(model_dir: str, root: str, out: str) -> None:
    """(subprocess with 8 CPU devices) the mixed run on one device and on a 2x2x2 mesh."""
    import pathlib

    from peftjax.config import MeshConfig
    from peftjax.train._sharding import make_mesh
    # every kind of bank entry (factors, magnitudes, (IA)³ vectors, prompts), 6 requests
    one, _, _ = run_mixed(model_dir, pathlib.Path(root) / "one", n=6, skip=("qv2",))
    many, _, engine = run_mixed(model_dir, pathlib.Path(root) / "many", n=6, skip=("qv2",),
                                mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    placed = {str(engine._k[0].sharding.spec), str(jax_tree_first(engine.bank.device).sharding)}
    with open(out, "w") as f:
        json.dump({"one": [r.tokens for r in one], "many": [r.tokens for r in many],
                   "placed": sorted(placed)}, f)


def jax_tree_first(tree):
    import jax
    return jax.tree.leaves(tree)[0]


def test_eight_devices_equal_one(tiny_dir, tmp_path):
    """The engine on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices (base sharded as in
    training, cache rows over data x fsdp) gives every row the same tokens as one device."""
    out = str(tmp_path / "mesh.json")
    on_eight_devices("from tests.serving.test_engine import _mesh_run; "
                     f"_mesh_run({tiny_dir('llama')!r}, {str(tmp_path)!r}, {out!r})", timeout=600)
    res = json.load(open(out))
    assert res["one"] == res["many"]
    assert any("data" in p for p in res["placed"]), res["placed"]  # really sharded


@pytest.fixture(scope="module")
def llama(tiny_dir, tmp_path_factory):
    base = from_pretrained(tiny_dir("llama"), progress=False)
    dirs = save_adapters(base, adapter_configs("llama"), tmp_path_factory.mktemp("adapters"))
    return base, dirs


def test_seeded_sampling_does_not_depend_on_the_batch(llama):
    """A sampled request with a seed gives the same tokens alone and among other requests;
    another seed gives others; top_p near 0 keeps only the top token (greedy)."""
    base, dirs = llama
    engine = Engine(base, adapters=dirs, max_batch=4, max_len=64, bank_slots=5)
    prompt = list(range(10, 30))
    def sampled(seed, top_p=0.9):
        return Request(prompt=prompt, adapter="all6", max_tokens=12, temperature=1.5,
                       top_p=top_p, seed=seed)
    alone = engine.generate([sampled(7)])[0].tokens
    crowd = engine.generate([Request(prompt=prompt[:5], adapter="qv2", max_tokens=4),
                             sampled(7), Request(prompt=prompt, max_tokens=12, temperature=1.0),
                             sampled(8)])
    assert crowd[1].tokens == alone
    assert crowd[3].tokens != alone
    greedy = engine.generate([Request(prompt=prompt, adapter="all6", max_tokens=12)])[0].tokens
    assert engine.generate([sampled(3, top_p=1e-9)])[0].tokens == greedy
    assert alone != greedy  # sampling at temperature 1.5 leaves the greedy path
    # an EOS id ends the row at its first occurrence (included), freeing it
    eos = greedy[4]
    stopped = engine.generate([Request(prompt=prompt, adapter="all6", max_tokens=12,
                                       eos=(eos,))])[0]
    assert stopped.tokens == greedy[:greedy.index(eos) + 1] and stopped.finish_reason == "stop"


def test_bank_lru_swapping_and_pinning():
    """The host side of the bank: least recently used adapters leave first, a slot running a
    request is never taken, and a request waits (None) when every slot is busy."""
    shapes = {"l": (4, 3)}
    bank = AdapterBank(shapes, slots=3, rank=2)  # slot 0 (base) + 2 adapter slots
    from peftjax.tuners import ServingTerms
    for n in "abc":
        bank.add(n, {"l": ServingTerms(a_IxR=np.ones((4, 2)), b_RxO=np.ones((2, 3)), scale=1.0)})
    sa, sb = bank.acquire("a"), bank.acquire("b")
    assert {sa, sb} == {1, 2} and bank.acquire(None) == 0
    assert bank.acquire("c") is None  # both slots run requests
    bank.release(sa)
    sc = bank.acquire("c")  # "a" was free and least recently used
    assert sc == sa and "a" not in bank.resident and bank.loads == 3
    np.testing.assert_array_equal(np.asarray(bank.device["l"]["A"][sc]), np.ones((4, 2)))
    bank.release(sb)
    bank.release(sc)
    assert bank.acquire("c") == sc and bank.loads == 3  # resident: no new load
    # replacing an adapter that runs: the running request keeps the old version's slot, new
    # requests load the new version elsewhere; the old slot is reused once free
    bank.release(sc)
    old_slot = bank.acquire("c")
    bank.add("c", {"l": ServingTerms(a_IxR=2 * np.ones((4, 2)), b_RxO=np.ones((2, 3)), scale=1.0)})
    new_slot = bank.acquire("c")
    assert new_slot != old_slot
    np.testing.assert_array_equal(np.asarray(bank.device["l"]["A"][new_slot]), 2 * np.ones((4, 2)))
    np.testing.assert_array_equal(np.asarray(bank.device["l"]["A"][old_slot]), np.ones((4, 2)))
    bank.release(old_slot)
    bank.release(new_slot)
    assert bank.acquire("a") == old_slot  # the retired version's slot went first (LRU)
    with pytest.raises(ValueError, match="rank 3, above the bank's max_rank 2"):
        bank.add("big", {"l": ServingTerms(a_IxR=np.ones((4, 3)), b_RxO=np.ones((3, 3)))})
    with pytest.raises(ValueError, match="layers the bank does not cover"):
        bank.add("far", {"m": ServingTerms(in_scale_I=np.ones(4))})


def test_refusals(llama, tiny_dir, tmp_path):
    """Adapters that do not fit, and bad requests, are refused with the reason."""
    base, dirs = llama
    engine = Engine(base, adapters={"qv2": dirs["qv2"]}, max_batch=2, max_len=48,
                    base_name=tiny_dir("llama"))
    assert engine.bank.rank == 2 and len(engine.bank.shapes) == 6  # q, v of 3 layers
    with pytest.raises(ServingError, match="rank 6, above the bank's max_rank 2"):
        engine.register("all6", dirs["all6"])
    with pytest.raises(ServingError, match="layers the bank does not cover"):
        engine.register("ia3", dirs["ia3"])
    # an adapter trained on another base: its keys do not fit
    other = from_pretrained(tiny_dir("qwen3"), progress=False)
    pm = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"]), rngs=nnx.Rngs(0))
    pm.save_pretrained(str(tmp_path / "qwen3_lora"))
    cfg_file = tmp_path / "qwen3_lora" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "base_model_name_or_path": tiny_dir("qwen3")}))
    with pytest.raises(ServingError, match="trained on .*qwen3"):
        engine.register("other", str(tmp_path / "qwen3_lora"))
    with pytest.raises(ValueError, match="q_proj.lora_B.weight has shape"):
        engine.register("other", str(tmp_path / "qwen3_lora"), check_base=False)
    # methods the bank does not serve, soft prompts longer than the bank holds (this engine
    # started without any: 0), and adapters that train base modules
    pm = get_peft_model(nnx.clone(base), PrefixTuningConfig(num_virtual_tokens=4),
                        rngs=nnx.Rngs(0))
    pm.save_pretrained(str(tmp_path / "prefix"))
    with pytest.raises(ServingError, match="prefix_tuning adapters are not served"):
        engine.register("prefix", str(tmp_path / "prefix"))
    with pytest.raises(ServingError, match="5 virtual tokens in front; the bank holds 0; start "
                                           "the engine with max_virtual_tokens >= 5"):
        engine.register("prompt", dirs["prompt"])
    pm = get_peft_model(nnx.clone(base), LoraConfig(r=2, target_modules=["q_proj"],
                                                    modules_to_save=["lm_head"]),
                        rngs=nnx.Rngs(0))
    pm.save_pretrained(str(tmp_path / "with_head"))
    with pytest.raises(ServingError, match="modules_to_save"):
        engine.register("with_head", str(tmp_path / "with_head"))
    assert engine.adapters == ["qv2"]
    # requests
    for req, match in [(Request(prompt=[]), "empty"),
                       (Request(prompt=[3] * 40, max_tokens=10), "exceeds the engine's max_len"),
                       (Request(prompt=[3], adapter="nope"), "no adapter 'nope'"),
                       (Request(prompt=[3], temperature=-1), "temperature"),
                       (Request(prompt=[3], top_p=0), "top_p"),
                       (Request(prompt=[3], max_tokens=0), "max_tokens"),
                       (Request(prompt=[3, 10_000]), r"token ids must lie in \[0, 160\)")]:
        with pytest.raises(ServingError, match=match):
            engine.submit(req)
    # unloading fails waiting requests for it; the others run
    waiting = engine.submit(Request(prompt=[3, 4], adapter="qv2", max_tokens=3))
    fine = engine.submit(Request(prompt=[3, 4], max_tokens=3))
    engine.unregister("qv2")
    engine.generate([])
    while engine.busy:
        engine.step()
    assert waiting.finish_reason == "error" and "unloaded" in waiting.error
    assert fine.finish_reason == "length" and len(fine.tokens) == 3
