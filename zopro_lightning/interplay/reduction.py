"""Exact linear reductions of update sets to a few dimensions, from their Gram matrix.

**Gram coordinates.** For a ``[rows, D]`` matrix ``M = Q S V^T`` (thin SVD), the
coordinates of the rows in the basis of the top-k right singular vectors are
``M V_k = Q_k S_k``. They are computed from the ``rows x rows`` Gram matrix
``M M^T = Q S^2 Q^T`` (float64, accumulated over column chunks), so no ``D x k`` basis is
formed and D of millions is fine. With ``k = rank(M)`` the map is an isometry on the rows:
norms, angles and distances are exactly those in parameter space.

**Joint reduction to a common dimension** (:func:`reduce_pair`). When the two models share
coordinates (:func:`.trajectory.common_space`: tensors of the same name and shape, or the
same count sketch), both update sets are projected on one basis: the top-k right singular
vectors of the stacked paired updates ``M = [U; W]`` (an *uncentred* PCA, i.e. truncated
SVD), with ``k = min(2n, D, k_user)``. Uncentred, because updates are directions from the
current point, not samples around a mean: with ``k = rank(M) <= 2n`` the map is an isometry
on all rows, so norms, angles and distances, within and across the models, are exactly those
in parameter space, and a smaller ``k_user`` keeps the directions of most movement.
Without shared coordinates (``space="separate"``) each model is reduced alone to the same
``k = min(n, D_policy, D_reward, k_user)`` (again an isometry when k = n); the two bases are
then unrelated, and what compares coordinates across the models (update and velocity
angles, per-coordinate Pearson) is not reported (:mod:`.undefined`). Rotating the reward
updates onto the policy's first (orthogonal Procrustes) would fit the rotation to the very
pairs it is then judged on: for high-dimensional updates both Gram matrices are close to a
multiple of the identity, so *independent* update sets come out a few degrees apart
(n = 11, D = 1000: about 3 degrees, and per-coordinate r about 1). What does not depend on
the basis is reported: Procrustes, distance correlation, Pearson r of the update norms.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from .pairing import PairedUpdates

_RANK_TOL = 1e-9  # squared singular values below this fraction of the top one are 0
_CHUNK = 1 << 16  # columns per block of the Gram accumulation


def gram_coordinates(m: np.ndarray, k: int | None = None) -> tuple[np.ndarray, float]:
    """Rows of ``m`` in the basis of its top-k right singular vectors, and the energy kept.

    ``m = Q S V^T``; returns ``Q_k S_k = m V_k`` (``[rows, k]``) from the eigen-decomposition
    of the Gram matrix ``m m^T`` accumulated in float64 over column chunks, and
    ``sum_k s^2 / sum s^2``. Directions with ``s^2 < 1e-9 s_1^2`` (numerically zero) are
    dropped, so k never exceeds the numerical rank.
    """
    rows = m.shape[0]
    gram = np.zeros((rows, rows))
    # One BLAS thread: multi-threaded OpenBLAS is ~100x slower on this short-and-wide
    # product on small machines (0.9 s instead of 0.01 s for 80 x 50k on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"):
        for start in range(0, m.shape[1], _CHUNK):
            block = np.ascontiguousarray(m[:, start : start + _CHUNK], dtype=np.float64)
            gram += block @ block.T
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.maximum(evals[order], 0.0), evecs[:, order]
    rank = max(1, int(np.sum(evals > evals[0] * _RANK_TOL))) if evals.size else 0
    cap = min(rank, m.shape[1])
    k = cap if k is None else max(1, min(k, cap))
    total = float(evals.sum())
    kept = float(evals[:k].sum()) / total if total > 0 else 1.0
    return evecs[:, :k] * np.sqrt(evals[:k]), kept


def centred_pca(x: np.ndarray, k: int) -> np.ndarray:
    """Centred PCA coordinates of the rows of x, zero-padded to exactly k columns:
    :func:`gram_coordinates` of ``x - mean_rows(x)``, then ``k`` columns."""
    coords, _ = gram_coordinates(x - x.mean(axis=0, keepdims=True, dtype=np.float64), k)
    out = np.zeros((x.shape[0], k))
    out[:, : coords.shape[1]] = coords[:, :k]
    return out


def reduce_pair(pairs: PairedUpdates, k: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Both update sets reduced to k dims (see the module docstring): in one frame with shared
    coordinates, each in its own otherwise. Returns (U, W, energy kept)."""
    n = pairs.policy.shape[0]
    if pairs.space != "separate":
        both, kept = gram_coordinates(np.concatenate([pairs.policy, pairs.reward]), k)
        return both[:n], both[n:], kept
    k_common = min(n, pairs.policy.shape[1], pairs.reward.shape[1], k or n)
    u, kept_u = gram_coordinates(pairs.policy, k_common)
    w, kept_w = gram_coordinates(pairs.reward, k_common)
    return u, w, min(kept_u, kept_w)
