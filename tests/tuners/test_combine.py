"""``PeftModel.add_weighted_adapter`` against PyTorch PEFT's on the same adapters: every LoRA
combination type (DARE with PEFT's own random masks replayed), (IA)³, the errors."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peftjax import PeftModel  # noqa: E402
from peftjax.models import from_pretrained  # noqa: E402
from peftjax.tuners._lora import lora_layers  # noqa: E402
from tests.conftest import batch, hf_class  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = ["a", "b", "c"]
WEIGHTS = [0.7, -0.4, 1.3]


@pytest.fixture(scope="module")
def torch_and_ours(tiny_dir, tmp_path_factory):
    """PyTorch PEFT and peftjax holding the same three random LoRA adapters (r = 4, 4, 6 with
    rank_pattern on down_proj for ``c``) on the tiny Llama; returns a function that makes a
    fresh pair (each combination adds an adapter)."""
    path = tiny_dir("llama")
    root = tmp_path_factory.mktemp("combine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_class("llama", "causal_lm").from_pretrained(path).eval()
        for i, name in enumerate(ADAPTERS):
            torch.manual_seed(10 + i)
            cfg = peft.LoraConfig(r=4, lora_alpha=8 + 4 * i, target_modules=TARGETS,
                                  init_lora_weights=False,
                                  rank_pattern={"down_proj": 6} if name == "c" else {})
            if i == 0:
                pt = peft.get_peft_model(model, cfg, adapter_name=name)
            else:
                pt.add_adapter(name, cfg)
        pt.save_pretrained(str(root))  # one subdirectory per adapter name

    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(
                hf_class("llama", "causal_lm").from_pretrained(path).eval(), str(root / "a"),
                adapter_name="a")
            for name in ADAPTERS[1:]:
                theirs.load_adapter(str(root / name), adapter_name=name)
        ours = PeftModel.from_pretrained(from_pretrained(path, progress=False), str(root / "a"),
                                         adapter_name="a")
        for name in ADAPTERS[1:]:
            ours.load_adapter(str(root / name), name)
        return theirs, ours
    make.root = root
    return make


def their_deltas(pt, name):
    out = {}
    for key, m in pt.base_model.model.named_modules():
        if hasattr(m, "lora_A") and name in m.lora_A:
            out[key] = m.get_delta_weight(name).detach().numpy()
    return out


def our_deltas(model, name):
    return {n: np.asarray(layer.lora[name].delta_IxO()).T
            for n, layer in lora_layers(model.base_model) if name in layer.lora}


def recorded_bernoulli(monkeypatch, pt, new_name, adapters, svd: bool):
    """Replaces torch.bernoulli in PEFT's merge utilities by one that records its masks, and
    returns ``dare_mask`` replaying them by (layer, part, adapter index) in PEFT's order."""
    import peft.utils.merge_utils as mu
    masks = []
    real = torch.bernoulli

    def recording(p, *a, **k):
        m = real(p, *a, **k)
        masks.append(m.numpy().copy())
        return m
    monkeypatch.setattr(mu.torch, "bernoulli", recording)

    def replay(layer, part, index, shape, density):
        order = [key for key, m in pt.base_model.model.named_modules()
                 if hasattr(m, "lora_A") and new_name in m.lora_A]
        present = [i for i, a in enumerate(adapters)]  # every adapter adapts every target here
        parts = ["delta"] if svd else ["lora_A", "lora_B"]
        slots = [(k, p, i) for k in order for p in parts for i in present]
        mask = masks[slots.index((layer, part, index))]
        assert mask.shape == tuple(shape)
        return jnp.asarray(mask)
    return replay


def canonical_torch_svd(m, full_matrices=True, driver=None):
    """torch.linalg.svd with peftjax's sign rule (the largest entry of each Vh row positive)."""
    u, s, vh = _TORCH_SVD(m, full_matrices=full_matrices)
    k = s.shape[0]
    pivot = vh[:k].gather(1, vh[:k].abs().argmax(1, keepdim=True))[:, 0]
    sign = torch.where(pivot < 0, -1.0, 1.0)
    u, vh = u.clone(), vh.clone()
    u[:, :k] *= sign[None, :]
    vh[:k] *= sign[:, None]
    return u, s, vh


_TORCH_SVD = torch.linalg.svd


@pytest.mark.parametrize("kind, extra", [
    ("svd", {}), ("svd", {"svd_rank": 3}), ("svd", {"svd_clamp": 0.95}), ("cat", {}),
    ("linear", {}), ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}), ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}), ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.5}), ("dare_ties_svd", {"density": 0.7}),
    ("magnitude_prune_svd", {"density": 0.4})])
def test_lora_combinations_match_peft(torch_and_ours, monkeypatch, kind, extra):
    theirs, ours = torch_and_ours()
    # linear-family rules need one rank: combine a and b (r=4); the others take all three
    names = ADAPTERS if kind == "cat" or kind.endswith("svd") else ADAPTERS[:2]
    weights = WEIGHTS[:len(names)]
    options = dict(extra)
    if kind.startswith("dare"):
        options["dare_mask"] = recorded_bernoulli(monkeypatch, theirs, "mix", names,
                                                  kind.endswith("svd"))
    if "svd_clamp" in extra:  # the clamp's quantile depends on the SVD's signs: pin PEFT's
        monkeypatch.setattr(peft.tuners.lora.model.torch.linalg, "svd", canonical_torch_svd)
    torch_options = dict(extra)
    torch.manual_seed(0)  # PEFT's DARE masks (replayed into ours) are the same on every run
    with torch.no_grad():
        theirs.add_weighted_adapter(names, weights, "mix", combination_type=kind,
                                    **torch_options)
    ours.add_weighted_adapter(names, weights, "mix", combination_type=kind, **options)
    want, got = their_deltas(theirs, "mix"), our_deltas(ours, "mix")
    assert sorted(want) == sorted(got) and len(got) == 9
    for key in want:
        scale = max(np.abs(want[key]).max(), 1e-3)
        np.testing.assert_allclose(got[key], want[key], atol=1e-5 * scale, rtol=0, err_msg=key)
    if kind in ("ties", "cat"):  # and the models compute the same with it
        ids, mask = batch()
        theirs.set_adapter("mix")
        ours.set_adapter("mix")
        with torch.no_grad():
            t = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        o = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
        keep = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(o)[keep], t.numpy()[keep], atol=1e-4, rtol=0)


def test_merge_adapters_command(torch_and_ours, tmp_path):
    """``peftjax merge-adapters`` writes the combined adapter; PyTorch PEFT loads it and gets
    what its own add_weighted_adapter gives (the base model from the adapters' config)."""
    import subprocess
    import sys

    from tests.conftest import REPO
    root = torch_and_ours.root
    out = tmp_path / "ties"
    proc = subprocess.run(
        [sys.executable, "-m", "peftjax.cli", "merge-adapters", str(root / "a"), str(root / "b"),
         "--weights", "0.7", "-0.4", "--type", "ties", "--density", "0.5", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "combined 2 lora adapters (ties, weights [0.7, -0.4])" in proc.stdout
    theirs, _ = torch_and_ours()
    with torch.no_grad():
        theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="ties",
                                    density=0.5)
    theirs.load_adapter(str(out), adapter_name="cli")
    want, got = their_deltas(theirs, "mix"), their_deltas(theirs, "cli")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5 * np.abs(want[key]).max())
    proc = subprocess.run(
        [sys.executable, "-m", "peftjax.cli", "merge-adapters", str(root / "a"), str(root / "b"),
         "--weights", "1", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 1 and "2 adapters but 1 --weights" in proc.stderr, proc.stderr


def test_ia3_weighted_adapter_matches_peft(tiny_dir, tmp_path):
    path = tiny_dir("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = hf_class("llama", "causal_lm").from_pretrained(path).eval()
        torch.manual_seed(0)
        pt = peft.get_peft_model(base, peft.IA3Config(init_ia3_weights=False), adapter_name="a")
        pt.add_adapter("b", peft.IA3Config(init_ia3_weights=False))
        pt.save_pretrained(str(tmp_path))
        pt.add_weighted_adapter(["a", "b"], [0.6, 0.3], "mix")
    ours = PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path / "a"),
                                     adapter_name="a")
    ours.load_adapter(str(tmp_path / "b"), "b")
    ours.add_weighted_adapter(["a", "b"], [0.6, 0.3], "mix")
    from peftjax.tuners._ia3 import IA3Mixin
    from peftjax.tuners._layer import adapted_layers
    got = {n: np.asarray(layer.ia3["mix"].ia3_l[...])
           for n, layer in adapted_layers(ours.base_model, IA3Mixin)}
    want = {k: m.ia3_l["mix"].detach().numpy() for k, m in pt.base_model.model.named_modules()
            if hasattr(m, "ia3_l") and "mix" in m.ia3_l}
    assert sorted(got) == sorted(want) and got
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="apply to LoRA"):
        ours.add_weighted_adapter(["a", "b"], [0.5, 0.5], "x", combination_type="ties")


def test_combination_errors_are_clear(torch_and_ours):
    _, ours = torch_and_ours()
    with pytest.raises(ValueError, match="needs adapters of one rank, got r=\\[4, 4, 6\\]"):
        ours.add_weighted_adapter(ADAPTERS, WEIGHTS, "m", combination_type="linear")
    with pytest.raises(ValueError, match="needs density in \\[0, 1\\]"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ValueError, match="no adapter named \\['z'\\]"):
        ours.add_weighted_adapter(["a", "z"], [1, 1], "m")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        ours.add_weighted_adapter(["a", "b"], [1], "m")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        ours.add_weighted_adapter(["a"], [1], "b")
    with pytest.raises(ValueError, match="combination_type='avg' must be one of"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="avg")

    def failing_mask(*args):
        raise RuntimeError("mask source failed")
    with pytest.raises(RuntimeError, match="mask source failed"):  # fails midway: rolled back
        ours.add_weighted_adapter(["a", "b"], [1, 1], "m", combination_type="dare_linear",
                                  density=0.5, dare_mask=failing_mask)
    assert "m" not in ours.peft_configs
    assert all("m" not in layer.lora for _, layer in lora_layers(ours.base_model))
