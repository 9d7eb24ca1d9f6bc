"""Helpers the method tests share: quiet PEFT calls and logits from both sides."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` without PEFT's/transformers' warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def torch_logits(model, ids, mask) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def our_logits(model, ids, mask) -> np.ndarray:
    run = nnx.jit(lambda m, i, a: m(i, attention_mask=a))
    return np.asarray(run(model, jnp.asarray(ids), jnp.asarray(mask)).logits)


def max_diff(task: str, a, b, mask) -> float:
    """Largest difference over real tokens (per-token logits) or over rows (one per row)."""
    real = mask.astype(bool)
    return float(np.abs(a[real] - b[real]).max() if task == "causal_lm" else np.abs(a - b).max())


def layer_config(arch: str, task: str, **kw) -> dict:
    """Config kwargs (PEFT's and ours alike) for a layer method on a tiny model: GPT-2's Conv1D
    layout flag, and for a classifier the ``SEQ_CLS`` task with its head saved."""
    cfg = dict(kw)
    if arch == "gpt2":
        cfg["fan_in_fan_out"] = True
    if task != "causal_lm":
        cfg.update(task_type="SEQ_CLS", modules_to_save=["classifier"])
    return cfg


def peft_saved(hf_model, peft_config, directory: str, edit=None):
    """PyTorch PEFT's model for ``peft_config`` on ``hf_model`` (torch seed 0), optionally
    changed by ``edit(model)`` (under no_grad), saved to ``directory``; returned in eval mode."""
    import peft
    import torch
    torch.manual_seed(0)
    pm = quiet(peft.get_peft_model, hf_model.eval(), peft_config)
    if edit is not None:
        with torch.no_grad():
            edit(pm)
    pm.eval().save_pretrained(directory)
    return pm


class Probe:
    """Logits of both sides on one fixed batch (``ids``, ``mask``)."""

    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def torch(self, model) -> np.ndarray:
        return torch_logits(model, self.ids, self.mask)

    def ours(self, model) -> np.ndarray:
        return our_logits(model, self.ids, self.mask)

    def diff(self, task: str, a, b) -> float:
        return max_diff(task, a, b, self.mask)

    def assert_close(self, task: str, a, b, tol: float = 1e-5) -> None:
        """``a`` equals ``b`` over real tokens to ``tol`` absolute plus ``tol`` relative: two
        float32 computations of the same function in a different order (a merged weight, another
        batch shape) differ by rounding that grows with the logits' size and with the host's
        vector width (1.1e-5 absolute on logits near 2 on an AVX-512 Xeon, under 1e-5 on EPYC)."""
        real = self.mask.astype(bool)
        a, b = (np.asarray(a), np.asarray(b)) if task != "causal_lm" else (a[real], b[real])
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def greedy_reference(hf_model, row: list[int], n: int) -> list[int]:
    """``n`` tokens after ``row``: the PyTorch model's argmax, extended one token at a time
    without a cache (the reference for the cache path of generation)."""
    import torch
    seq = list(row)
    for _ in range(n):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([seq]),
                              attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(row):]
