"""Procrustes disparity and distance correlation of paired updates, with permutation baselines.

* :func:`procrustes_test`: :func:`scipy.spatial.procrustes` of the two update trajectories,
  each reduced by its own centred PCA to ``k = min(procrustes_k, n - 2)`` dims (default 3;
  :mod:`.undefined` says why not all dims): after centring, scaling to unit Frobenius norm
  and the best rotation/reflection, ``disparity = sum ||U' - W'||^2`` in [0, 1]; 0 = the
  same shape.
* :func:`dcor_test`: the bias-corrected dCor^2 of :func:`.statistics.distance_correlation`.

**Baselines.** The pairing of the rows is what is tested: the statistic is recomputed over
orders of the reward rows (:func:`scipy.stats.permutation_test`, ``n_permutations`` random
ones, or all ``n!`` when that is fewer: an exact test). The null mean is the value expected
by chance; the one-sided p-value counts orders at least as extreme as the observed one
(small disparity, large dCor^2), so it cannot go below ``1/n!``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial import procrustes

from .reduction import centred_pca
from .statistics import distance_correlation
from .undefined import MIN_PAIRS, json_float


def permutation_test(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_permutations: int,
    seed: int,
    alternative: str,
) -> tuple[np.ndarray, float]:
    """Null distribution and p-value of ``statistic(order)`` over orders of the reward rows.

    :func:`scipy.stats.permutation_test` on the row indices (``permutation_type="pairings"``,
    one sample): ``n_permutations`` random orders, or all ``n!`` when that is not more (exact).
    """
    result = stats.permutation_test(
        (np.arange(n),),
        lambda order: statistic(np.asarray(order, dtype=np.int64)),
        permutation_type="pairings",
        vectorized=False,
        n_resamples=n_permutations,
        alternative=alternative,
        rng=np.random.default_rng(seed),
    )
    return np.asarray(result.null_distribution, np.float64), float(result.pvalue)


def procrustes_test(
    u: np.ndarray, w: np.ndarray, k: int = 3, n_permutations: int = 199, seed: int = 0
) -> dict[str, Any]:
    """Procrustes disparity of two paired update sets in their own k-dim PCAs, with a baseline.

    ``k`` is capped at ``n - 2`` (:mod:`.undefined`, *Least pairs*). Returns ``{"k",
    "disparity", "permutation_mean", "p_value", "n_permutations", "exact"}``; the values are
    ``None`` below ``MIN_PAIRS["procrustes"]`` pairs or for a set without spread.
    """
    n = u.shape[0]
    k = max(1, min(k, n - 2))
    empty: dict[str, Any] = {
        "k": k,
        "disparity": None,
        "permutation_mean": None,
        "p_value": None,
        "n_permutations": 0,
        "exact": False,
    }
    if n < MIN_PAIRS["procrustes"]:
        return empty
    a, b = centred_pca(u, k), centred_pca(w, k)
    try:
        observed = procrustes(a, b)[2]
    except ValueError:  # all points equal in one set
        return empty
    out = empty | {"disparity": json_float(observed)}
    if n_permutations >= 1:
        null, p_value = permutation_test(
            lambda order: procrustes(a, b[order])[2], n, n_permutations, seed, "less"
        )
        out |= {
            "permutation_mean": json_float(float(null.mean())),
            "p_value": json_float(p_value),
            "n_permutations": int(null.size),
            "exact": math.factorial(n) <= n_permutations,
        }
    return out


def dcor_test(
    u: np.ndarray, w: np.ndarray, n_permutations: int = 199, seed: int = 0
) -> tuple[float, float]:
    """Bias-corrected dCor^2 of paired rows and its one-sided permutation p-value (nan if
    undefined, or below ``MIN_PAIRS["distance_correlation"]`` pairs)."""
    n = u.shape[0]
    if n < MIN_PAIRS["distance_correlation"]:
        return math.nan, math.nan
    observed = distance_correlation(u, w, unbiased=True)
    if not math.isfinite(observed) or n_permutations < 1:
        return observed, math.nan
    _, p_value = permutation_test(
        lambda order: distance_correlation(u, w[order], unbiased=True),
        n,
        n_permutations,
        seed,
        "greater",
    )
    return observed, p_value
