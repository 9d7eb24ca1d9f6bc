"""Bottleneck adapters against AdapterHub's ``adapters`` (the PyTorch reference): Pfeiffer
(``SeqBnConfig``) and Houlsby (``DoubleSeqBnConfig``) adapters saved by AdapterHub load here with
its logits, and ours load in AdapterHub with ours, within 1e-4, on BERT and RoBERTa classifiers
(post-norm: the block's LayerNorm inside the adapter's join) and Llama / GPT-2 (pre-norm);
identity at init on every family; AdapterHub's default ``pytorch_adapter.bin`` loads too;
options we do not implement are refused by name."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from flax import nnx

from peftjax import BottleneckConfig, PeftModel, count_parameters, get_peft_model
from peftjax.models import from_pretrained
from peftjax.models._safetensors import CheckpointError
from tests.conftest import ALL, ENCODERS, batch, hf_class, train_briefly
from tests.tuners.common import Probe

adapters = pytest.importorskip("adapters", reason="AdapterHub's adapters package (test extra)")

PROBE = Probe(*batch(lengths=(10, 6, 8)))
ARCHS = {"bert": "sequence_classification", "roberta": "sequence_classification",
         "llama": "causal_lm", "gpt2": "causal_lm"}
HUB = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig"}


def _hub_model(path, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_class(arch, ARCHS[arch]).from_pretrained(path).eval()
        adapters.init(model)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", list(HUB))
def test_adapterhub_file_loads_with_its_logits(tiny_dir, tmp_path, arch, kind):
    import torch
    task = ARCHS[arch]
    path = tiny_dir(arch, task)
    hub = _hub_model(path, arch)
    torch.manual_seed(0)
    hub.add_adapter("sst", config=getattr(adapters, HUB[kind])(reduction_factor=8))
    with torch.no_grad():  # AdapterHub's init is N(0, 0.02): make the adapters matter
        for n, p in hub.named_parameters():
            if ".adapters.sst." in n:
                p.normal_(0, 0.3)
    hub.set_active_adapters("sst")
    want = PROBE.torch(hub)
    hub.save_adapter(str(tmp_path), "sst", use_safetensors=True)
    ours = PeftModel.from_pretrained(from_pretrained(path, task=task, progress=False),
                                     str(tmp_path))
    assert ours.peft_config.architecture == kind
    base = PROBE.torch(hf_class(arch, task).from_pretrained(path).eval())
    assert PROBE.diff(task, want, base) > 1e-2  # the adapters change the outputs
    diff = PROBE.diff(task, PROBE.ours(ours), want)
    hub_count = sum(p.numel() for n, p in hub.named_parameters() if ".adapters.sst." in n)
    head = count_parameters(ours)[0] - hub_count  # AdapterHub's file also holds a classifier
    print(f"{arch} {kind}: AdapterHub file -> peftjax, max|logit diff| = {diff:.2e} "
          f"({hub_count} adapter parameters, head {head})")
    assert diff <= 1e-4
    # a classifier head loads as trained (modules_to_save); a causal LM's lm_head, which
    # AdapterHub stores beside the adapter unchanged, stays the base model's
    assert head == (0 if task == "causal_lm" else sum(
        int(np.prod(v[...].shape)) for _, v in
        nnx.to_flat_state(nnx.state(ours.base_model.classifier, nnx.Param))))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", list(HUB))
def test_peftjax_adapter_loads_in_adapterhub(tiny_dir, tmp_path, arch, kind):
    task = ARCHS[arch]
    path = tiny_dir(arch, task)
    extra = {} if task == "causal_lm" else {"modules_to_save": ["classifier"],
                                            "task_type": "SEQ_CLS"}
    ours = get_peft_model(from_pretrained(path, task=task, progress=False),
                          BottleneckConfig(architecture=kind, reduction_factor=8, **extra),
                          rngs=nnx.Rngs(0))
    assert np.array_equal(PROBE.ours(ours), PROBE.ours(from_pretrained(
        path, task=task, progress=False)))  # the up-projection starts at zero
    losses = train_briefly(ours, task, *batch(lengths=(12, 9, 7, 12), seed=5), lr=1e-2)
    assert losses[-1] < losses[0]
    after = PROBE.ours(ours)
    ours.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["config"]["mh_adapter"] is (kind == "houlsby") and saved["name"] == "default"
    hub = _hub_model(path, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = hub.load_adapter(str(tmp_path), use_safetensors=True, set_active=True)
    assert name == "default"
    diff = PROBE.diff(task, after, PROBE.torch(hub))
    print(f"{arch} {kind}: peftjax adapter -> AdapterHub, max|logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    again = PeftModel.from_pretrained(from_pretrained(path, task=task, progress=False),
                                      str(tmp_path))
    assert again.peft_config == ours.peft_config
    np.testing.assert_array_equal(PROBE.ours(again), after)


def test_identity_at_init_on_every_family(tiny_dir):
    for arch in ALL:
        task = "sequence_classification" if arch in ENCODERS else "causal_lm"
        path = tiny_dir(arch, task)
        base = PROBE.ours(from_pretrained(path, task=task, progress=False))
        for kind in HUB:
            model = get_peft_model(from_pretrained(path, task=task, progress=False),
                                   BottleneckConfig(architecture=kind, reduction_factor=4),
                                   rngs=nnx.Rngs(0))
            assert np.array_equal(PROBE.ours(model), base), (arch, kind)


def test_torch_pickle_options_and_errors(tiny_dir, tmp_path):
    import torch
    path = tiny_dir("llama")
    hub = _hub_model(path, "llama")
    torch.manual_seed(1)  # AdapterHub's defaults: pytorch_adapter.bin, "bert" init, per-layer
    config = adapters.SeqBnConfig(reduction_factor={"0": 4, "default": 8}, leave_out=[1],
                                  scaling="channel", non_linearity="gelu")
    hub.add_adapter("x", config=config)
    with torch.no_grad():
        for n, p in hub.named_parameters():
            if ".adapters.x." in n:
                p.normal_(0, 0.3)
    hub.set_active_adapters("x")
    want = PROBE.torch(hub)
    hub.save_adapter(str(tmp_path / "bin"), "x")
    assert (tmp_path / "bin" / "pytorch_adapter.bin").exists()
    ours = PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path / "bin"),
                                     adapter_name="mine")
    assert ours.peft_config.reduction_factor == {"0": 4, "default": 8}
    assert ours.peft_config.leave_out == (1,)
    assert PROBE.diff("causal_lm", PROBE.ours(ours), want) <= 1e-4

    hub.add_adapter("par", config=adapters.ParBnConfig())
    hub.save_adapter(str(tmp_path / "par"), "par", use_safetensors=True)
    with pytest.raises(CheckpointError, match="is_parallel"):
        PeftModel.from_pretrained(from_pretrained(path, progress=False), str(tmp_path / "par"))
    for bad, match in [({"architecture": "lora"}, "architecture='lora' must be one of"),
                       ({"reduction_factor": 0}, "reduction_factor=0"),
                       ({"non_linearity": "softsign"}, "non_linearity='softsign'"),
                       ({"mh_adapter": False, "output_adapter": False}, "no adapter to place"),
                       ({"scaling": "per-token"}, "scaling='per-token'")]:
        with pytest.raises(ValueError, match=match):
            BottleneckConfig(**bad)
    with pytest.raises(ValueError, match="leave_out=\\[7\\]: the model has no layer \\[7\\]"):
        get_peft_model(from_pretrained(path, progress=False), BottleneckConfig(leave_out=[7]),
                       rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="cannot be merged"):
        get_peft_model(from_pretrained(path, progress=False), BottleneckConfig(),
                       rngs=nnx.Rngs(0)).merge_and_unload()
