"""Combining adapters into a new one (``PeftModel.add_weighted_adapter``): the task-vector merge
rules PEFT implements (``peft.utils.merge_utils``), on stacked tensors, in float32.

- ``linear``: ``sum_i w_i t_i`` (task arithmetic).
- ``magnitude_prune``: each ``t_i`` keeps its ``density`` fraction of largest magnitudes, then
  the weighted sum.
- ``ties`` (Yadav et al. 2023): magnitude pruning, then per entry the majority sign -- the sign
  of the sum of the *unweighted* pruned tensors (``majority_sign_method="total"``) or of their
  signs (``"frequency"``) -- and the mean of the *weighted* entries that agree with it (divided
  by how many agree, not by their weights).
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2023): random pruning keeping each entry with
  probability ``density`` and rescaling by ``1 / density``, then the weighted sum / TIES' sign
  election and disjoint mean.

These are PEFT's conventions. mergekit's TIES differs: it elects the sign from the weighted
task vectors and divides the agreeing sum by the sum of the agreeing weights (its
``normalize``), so with unequal weights the two give different results; we follow PEFT (whose
files and results users compare against). DARE's random masks come from ``dare_mask`` (a
function of (layer name, part, adapter index, shape) returning 0/1), by default a Bernoulli
draw from a key derived from ``seed`` and those names, so a merge is reproducible and does not
depend on the order layers are visited.
"""

from __future__ import annotations

import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
                "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
NEEDS_DENSITY = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude")))
SIGN_METHODS = ("total", "frequency")


def default_dare_mask(seed: int) -> Callable:
    """Bernoulli(density) masks keyed by ``seed`` and the (layer, part, adapter) they are for."""
    base = jax.random.key(seed)

    def mask(layer: str, part: str, index: int, shape: tuple, density: float) -> jax.Array:
        key = jax.random.fold_in(base, zlib.crc32(f"{layer}/{part}".encode()) & 0x7FFFFFFF)
        key = jax.random.fold_in(key, index)
        return jax.random.bernoulli(key, density, shape).astype(jnp.float32)
    return mask


def canonical_svd(m, full_matrices: bool = True) -> tuple:
    """``(U, S, Vh)`` of ``m`` (in float64 on the host: a merge runs once, and the truncated
    factors of a pruned, full-rank change are sensitive to float32 rounding where singular
    values lie close), each singular pair's sign fixed so that the largest-magnitude entry of
    its row of ``Vh`` is positive. The SVD's signs are otherwise whatever the LAPACK build
    picks (PyTorch's and JAX's differ for about a third of random matrices); products
    ``U S Vh`` do not depend on them, but ``svd_clamp``'s quantile does."""
    u, s, vh = np.linalg.svd(np.asarray(m, np.float64), full_matrices=full_matrices)
    k = s.shape[0]
    pivot = np.take_along_axis(vh[:k], np.argmax(np.abs(vh[:k]), axis=1)[:, None], axis=1)
    sign = np.where(pivot[:, 0] < 0, -1.0, 1.0)
    u[:, :k] *= sign[None, :]
    vh[:k] *= sign[:, None]
    return u, s, vh


def prune_magnitude(t: jax.Array, density: float) -> jax.Array:
    """``t`` with all but its ``int(density * size)`` largest magnitudes set to zero."""
    if density >= 1:
        return t
    flat = t.reshape(-1)
    k = int(density * flat.shape[0])
    keep = jnp.zeros(flat.shape, bool)
    if k > 0:
        keep = keep.at[jax.lax.top_k(jnp.abs(flat), k)[1]].set(True)
    return jnp.where(keep, flat, 0.0).reshape(t.shape)


def majority_sign_mask(stacked: jax.Array, method: str) -> jax.Array:
    sign = jnp.sign(stacked)
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == jnp.where(magnitude >= 0, 1.0, -1.0)


def disjoint_merge(weighted: jax.Array, agree: jax.Array) -> jax.Array:
    total = (weighted * agree).sum(0)
    return total / jnp.maximum(agree.sum(0).astype(jnp.float32), 1.0)


def combine_tensors(kind: str, tensors: list, weights: list, *, density: float | None,
                    sign_method: str, masks: list | None = None) -> jax.Array:
    """One merged tensor from ``tensors`` (same shape) with ``weights``; ``kind`` is the rule
    without its ``_svd`` suffix. ``masks`` (DARE): one 0/1 array per tensor."""
    ts = [jnp.asarray(t, jnp.float32) for t in tensors]
    if kind in ("magnitude_prune", "ties"):
        ts = [prune_magnitude(t, density) for t in ts]
    elif kind.startswith("dare") and density < 1:
        ts = [t * m / density for t, m in zip(ts, masks)]
    stacked = jnp.stack(ts)
    w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * ts[0].ndim)
    if kind in ("ties", "dare_ties"):
        return disjoint_merge(stacked * w, majority_sign_mask(stacked, sign_method))
    return (stacked * w).sum(0)


def check_options(combination_type: str, density, majority_sign_method: str) -> None:
    problems = []
    if combination_type not in COMBINATIONS:
        problems.append(f"combination_type={combination_type!r} must be one of {COMBINATIONS}")
    elif combination_type in NEEDS_DENSITY:
        if density is None or not 0.0 <= density <= 1.0:
            problems.append(f"combination_type={combination_type!r} needs density in [0, 1] "
                            f"(the fraction of entries kept), got {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        problems.append(f"majority_sign_method={majority_sign_method!r} must be one of "
                        f"{SIGN_METHODS}")
    if problems:
        raise ValueError("add_weighted_adapter: " + "; ".join(problems) + ".")
