"""Policy-reward interplay metrics on the *updates* of the two trajectories (numpy/scipy).

Notation: policy snapshots ``theta_0..``, reward snapshots ``phi_0..``; updates
``u = theta_b - theta_a`` and ``w = phi_b - phi_a`` between consecutive key snapshots.

**Updates and pairing.** ``pairing="iteration"`` uses, per model, the first snapshot and
the last snapshot of every iteration, so update t is the whole move of iteration t:
``mu_t = theta_t - theta_{t-1}`` and ``v_t = phi_{t+1} - phi_t`` as in DESIGN.md section 2
(intra-iteration snapshots only feed the trajectory plots). ``pairing="index"`` uses the
row differences of every snapshot, update i of one model against update i of the other.
``"auto"`` (default) takes ``"iteration"`` when it yields at least 2 pairs, else
``"index"``. ``offset`` pairs reward update t with policy update ``t + offset``:
``offset=1`` asks whether the reward refinement of iteration t is reflected in the policy
learning of iteration t+1 (ZOPrO's sampler builds on exactly that reward update).

**Joint reduction to a common dimension.** When the two models share coordinates
(:func:`.trajectory.common_space`: tensors of the same name and shape, or the same count
sketch), both update sets are projected on one basis: the top-k right singular vectors of
the stacked paired updates ``M = [U; W]`` (an *uncentred* PCA, i.e. truncated SVD), with
``k = min(2n, D, k_user)``. Uncentred, because updates are directions from the current
point, not samples around a mean: with ``k = rank(M) <= 2n`` the map is an isometry on
all rows, so norms, angles and distances, within and across the models, are exactly those
in parameter space, and a smaller ``k_user`` keeps the directions of most movement. The
coordinates are computed from the ``2n x 2n`` Gram matrix ``M M^T = Q S^2 Q^T`` as
``Q_k S_k`` (no D x k basis is formed, so D of millions is fine).
Without shared coordinates (``space="separate"``) each model is reduced alone to the same
``k = min(n, D_policy, D_reward, k_user)`` (again an isometry when k = n); the two bases are
then unrelated, and what compares coordinates across the models (update and velocity
angles, per-coordinate Pearson) is not reported. Rotating the reward updates onto the
policy's first (orthogonal Procrustes) would fit the rotation to the very pairs it is then
judged on: for high-dimensional updates both Gram matrices are close to a multiple of the
identity, so *independent* update sets come out a few degrees apart (n = 11, D = 1000:
about 3 degrees, and per-coordinate r about 1). What does not depend on the basis is
reported: Procrustes, distance correlation, Pearson r of the update norms.

**Metrics** (on the n paired reduced updates ``u_i``, ``w_i``):

* ``procrustes``: :func:`scipy.spatial.procrustes` of the two update trajectories, each
  reduced by its own centred PCA to ``k = min(procrustes_k, n - 2)`` dims (default 3): after
  centring, scaling to unit Frobenius norm and the best rotation/reflection,
  ``disparity = sum ||U' - W'||^2`` in [0, 1]; 0 = the same shape. Not on all dims: see
  *Least pairs* below. A permutation baseline (:func:`scipy.stats.permutation_test` over
  the orders of the reward rows, ``n_permutations`` random ones, or all ``n!`` when that is
  fewer: an exact test) gives the disparity expected by chance and a one-sided p-value
  (small disparity = significant).
* ``angle_updates_deg[i] = angle(u_i, w_i)`` in degrees, computed as
  ``2 atan2(||a^ - b^||, ||a^ + b^||)`` (accurate near 0 and 180), ``None`` for a zero update.
* ``angle_velocities_deg[i] = angle(u_i - u_{i-1}, w_i - w_{i-1})`` for i >= 1: the change
  of direction ("velocity of the updates").
* ``distance_correlation``: dCor of the samples ``{(u_j, w_j)}`` (Szekely, Rizzo & Bakirov
  2007), as the *bias-corrected* estimate of dCor^2 (U-centred distance matrices, Szekely
  & Rizzo 2014): about 0 for independent updates, 1 for identical ones, may be negative.
  The plain V-statistic is biased towards 1 when the dimension exceeds the number
  of samples (always the case here: ~0.95 for independent 38-dim samples with n = 19), so
  it is reported only as ``overall_v_statistic``. *Per step* i: over the pairs ``0..i``
  (cumulative, ``window=None``, default; noise shrinks as pairs accumulate) or over the
  last ``window`` pairs. Over all pairs with a one-sided permutation p-value
  (:func:`scipy.stats.permutation_test`, as for Procrustes).
* ``pearson``: :func:`scipy.stats.pearsonr` over time (i) of the update norms ``||u_i||`` vs
  ``||w_i||`` (do both models move a lot at the same times? with pearsonr's two-sided
  t-test p-value) and (ii) per coordinate d of
  the shared space (a parameter, or a sketch bucket), ``r_d = corr_i(u_{i,d}, w_{i,d})``
  (does a parameter move the same way in both models at the same times?). (ii) is taken on
  the full common-space updates, not the joint basis (whose minor directions are fitted to
  the two sets together, which builds correlations of +-1 into them); not reported
  without shared coordinates. Summaries: the
  mean of ``r_d`` weighted by each coordinate's energy ``sum_i (u~_id^2 + w~_id^2)`` (tilde:
  centred over time), the pooled ``sum u~ w~ / sqrt(sum u~^2 sum w~^2)`` over all (i, d),
  and a histogram of ``r_d``.

**Least pairs** (:data:`MIN_PAIRS`). Below its minimum a statistic is ``None`` in the JSON,
``unavailable[name]`` says why ("n/a: 4 pairs, needs >= 5") and the plots print that instead
of a value. The minimum is where the statistic stops being decided by its definition
rather than by the data:

* Pearson r, n >= 4; bias-corrected dCor^2, n >= 5. Both are the cosine of two vectors in
  a v-dimensional space: the centred series (v = n - 1), the U-centred distance matrices
  (v = n(n - 3)/2, Szekely & Rizzo 2014 section 4). For independent data the cosine is
  distributed (for dCor approximately; the dCor t-test of Szekely & Rizzo 2013 rests on
  it) as between a fixed and a random direction, with density ``(1 - r^2)^((v - 3)/2)``:
  U-shaped with its modes at +-1 for v = 2, flat for v = 3, peaked at 0 for v >= 4. A
  value is drawn from v >= 3, where +-1 is no likelier by chance than 0. Pearson: n = 2
  gives +-1 always, n = 3 has v = 2. dCor^2: defined from n = 4, but n = 4 has v = 2
  (|r| > 0.99 in 9 % of independent draws: the -1.000 of a 4-pair run), and n = 5 has v = 5.
* Procrustes, n >= 3, with ``k = min(procrustes_k, n - 2)``: n centred points span n - 1
  dims; at ``k >= n - 1`` the PCA drops nothing and the disparity depends only on the
  pairwise distances, which concentrate for high-dimensional updates, so *any* two sets are
  nearly congruent (independent 50-dim updates: median disparity 0.01 at n = 3, 0.03 at
  n = 4, against 0.44 at n = 4 with k = 2). k >= 1 then needs n >= 3 (n = 2: always 0).
  Its p-value cannot go below ``1/n!``.
* update angle, 1 pair; velocity angle, 2 pairs (a difference of two). Without shared
  coordinates neither, nor per-coordinate Pearson, at any n (see above).

Other undefined values (zero variance, zero updates) are ``None`` in the JSON too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial import procrustes
from threadpoolctl import threadpool_limits

from .trajectory import Trajectories, Trajectory, common_space

_TINY = 1e-30
_RANK_TOL = 1e-9  # squared singular values below this fraction of the top one are 0

#: Least update pairs for a statistic to be reported (module docstring, *Least pairs*).
MIN_PAIRS = {
    "angle_updates": 1,
    "angle_velocities": 2,
    "pearson": 4,  # of the update norms
    "pearson_per_coordinate": 4,
    "distance_correlation": 5,
    "procrustes": 3,
}
#: Statistics that compare coordinates across the models: none without shared coordinates.
NEEDS_SHARED_COORDINATES = ("angle_updates", "angle_velocities", "pearson_per_coordinate")


def unavailable(statistic: str, n: int, space: str = "shared-parameters") -> str | None:
    """Why ``statistic`` (a key of :data:`MIN_PAIRS`) is not reported for n pairs in
    ``space`` (``"n/a: 4 pairs, needs >= 5"``), or ``None`` when it is."""
    if space == "separate" and statistic in NEEDS_SHARED_COORDINATES:
        return "n/a: no shared coordinates"
    need = MIN_PAIRS[statistic]
    return None if n >= need else f"n/a: {n} pair{'' if n == 1 else 's'}, needs \u2265 {need}"


# ----------------------------------------------------------------------------- primitives
def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors in degrees, ``nan`` if either is zero."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na <= _TINY or nb <= _TINY:
        return math.nan
    ua, ub = np.asarray(a, np.float64) / na, np.asarray(b, np.float64) / nb
    return math.degrees(2.0 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def _distances(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    sq = np.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _double_centre(a: np.ndarray) -> np.ndarray:
    return a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True) + a.mean()


def _u_centre(a: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    u = (
        a
        - a.sum(0, keepdims=True) / (n - 2)
        - a.sum(1, keepdims=True) / (n - 2)
        + a.sum() / ((n - 1) * (n - 2))
    )
    np.fill_diagonal(u, 0.0)
    return u


def distance_correlation(x: np.ndarray, y: np.ndarray, *, unbiased: bool = False) -> float:
    """Distance correlation of paired samples ``x[i] <-> y[i]`` (rows), ``nan`` if undefined.

    V-statistic (default): with ``a_ij = ||x_i - x_j||`` double centred to ``A`` (and ``B``
    from y), ``dCov^2 = mean(A * B)`` and ``dCor = sqrt(dCov^2(x,y) / sqrt(dCov^2(x,x)
    dCov^2(y,y)))``, in [0, 1]. ``unbiased=True``: the U-centred ``A~`` (zero diagonal),
    ``dCov_u^2 = sum(A~ * B~) / (n (n - 3))`` and the bias-corrected ratio
    ``dCov_u^2(x,y) / sqrt(dCov_u^2(x,x) dCov_u^2(y,y))``, an unbiased-numerator estimate of
    dCor^2 (not its root; may be negative), needing n >= 4 (the analysis asks for
    ``MIN_PAIRS["distance_correlation"]``). Equal to ``dcor.distance_correlation`` and
    ``dcor.u_distance_correlation_sqr`` (tests/test_interplay.py checks it). Kept instead of
    calling ``dcor``: importing ``dcor`` loads its numba kernels, about 5 s a process on
    2 CPU cores, and this module is imported by the training callbacks (through
    ``zopro_lightning.interplay``) and runs at the end of every ``zopro-train``; and ``dcor``
    returns 0 where the ratio is 0/0 (a set of identical updates), which is ``nan`` here.
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"paired samples needed, got {n} and {len(y)}")
    if n < (4 if unbiased else 2):
        return math.nan
    centre = _u_centre if unbiased else _double_centre
    a, b = centre(_distances(x)), centre(_distances(y))
    vxy, vxx, vyy = float(np.sum(a * b)), float(np.sum(a * a)), float(np.sum(b * b))
    if vxx <= _TINY or vyy <= _TINY:
        return math.nan
    r = vxy / math.sqrt(vxx * vyy)
    return r if unbiased else math.sqrt(max(r, 0.0))


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of two series (:func:`scipy.stats.pearsonr`), ``nan`` with fewer
    than 2 points or no variance (the analysis asks for ``MIN_PAIRS["pearson"]`` points)."""
    return pearson_test(x, y)[0]


def pearson_test(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """``(r, two-sided p)`` of :func:`scipy.stats.pearsonr`, ``(nan, nan)`` if undefined."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if xa.size < 2 or np.ptp(xa) <= _TINY or np.ptp(ya) <= _TINY:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        result = stats.pearsonr(xa, ya)
    return float(result.statistic), float(result.pvalue)


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
        for start in range(0, m.shape[1], 1 << 16):
            block = np.ascontiguousarray(m[:, start : start + (1 << 16)], dtype=np.float64)
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


# ----------------------------------------------------------------------------- pairing
def update_keypoints(iterations: np.ndarray, pairing: str) -> tuple[list[int], list[int]]:
    """Snapshot indices that delimit updates, and each update's label.

    ``"index"``: every snapshot; update i (label i) is row i+1 minus row i.
    ``"iteration"``: the first snapshot, then the last snapshot of each iteration (in save
    order); an update is labelled with the iteration it ends.
    """
    n = len(iterations)
    if pairing == "index":
        return list(range(n)), list(range(n - 1))
    if pairing != "iteration":
        raise ValueError(f"pairing must be 'iteration', 'index' or 'auto', got {pairing!r}")
    last: dict[int, int] = {}
    for i, it in enumerate(iterations.tolist()):
        last[it] = i
    ends = sorted(last.values())
    keys = [0] + [i for i in ends if i != 0]
    return keys, [int(iterations[i]) for i in keys[1:]]


@dataclass(frozen=True)
class PairedUpdates:
    """Paired updates ``policy[i] <-> reward[i]`` (full vectors, in ``space`` coordinates)."""

    policy: np.ndarray
    reward: np.ndarray
    space: str
    pairing: str
    offset: int
    policy_end: list[int]
    reward_end: list[int]
    note: str


def pair_updates(
    policy: Trajectory, reward: Trajectory, offset: int = 0, pairing: str = "auto"
) -> PairedUpdates:
    """Compute both models' updates and pair reward update t with policy update t+offset."""
    common = common_space(policy, reward)
    p_pts = common.policy if common else policy.points
    r_pts = common.reward if common else reward.points

    def build(kind: str) -> tuple[list[int], list[int], list[int], list[int]]:
        pk, pl = update_keypoints(policy.iterations, kind)
        rk, rl = update_keypoints(reward.iterations, kind)
        p_of = {label: j for j, label in enumerate(pl)}
        pi, ri = [], []
        for j, label in enumerate(rl):
            if label + offset in p_of:
                ri.append(j)
                pi.append(p_of[label + offset])
        return pk, rk, pi, ri

    kind = pairing
    if pairing == "auto":
        kind = "iteration"
        if len(build("iteration")[2]) < 2:
            kind = "index"
    pk, rk, pi, ri = build(kind)
    p_upd = np.diff(p_pts[pk], axis=0)[pi] if pi else np.zeros((0, p_pts.shape[1]))
    r_upd = np.diff(r_pts[rk], axis=0)[ri] if ri else np.zeros((0, r_pts.shape[1]))
    return PairedUpdates(
        policy=p_upd,
        reward=r_upd,
        space=common.kind if common else "separate",
        pairing=kind,
        offset=offset,
        policy_end=[pk[i + 1] for i in pi],
        reward_end=[rk[j + 1] for j in ri],
        note=common.note if common else "no shared coordinates: each model on its own basis",
    )


# ----------------------------------------------------------------------------- analysis
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


def _json(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _own_pca(x: np.ndarray, k: int) -> np.ndarray:
    """Centred PCA coordinates of the rows of x, zero-padded to exactly k columns."""
    coords, _ = gram_coordinates(x - x.mean(axis=0, keepdims=True, dtype=np.float64), k)
    out = np.zeros((x.shape[0], k))
    out[:, : coords.shape[1]] = coords[:, :k]
    return out


def _permutation_test(
    statistic: Any, n: int, n_permutations: int, seed: int, alternative: str
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

    ``k`` is capped at ``n - 2`` (module docstring, *Least pairs*). Returns ``{"k",
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
    a, b = _own_pca(u, k), _own_pca(w, k)
    try:
        observed = procrustes(a, b)[2]
    except ValueError:  # all points equal in one set
        return empty
    out = empty | {"disparity": _json(observed)}
    if n_permutations >= 1:
        null, p_value = _permutation_test(
            lambda order: procrustes(a, b[order])[2], n, n_permutations, seed, "less"
        )
        out |= {
            "permutation_mean": _json(float(null.mean())),
            "p_value": _json(p_value),
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
    _, p_value = _permutation_test(
        lambda order: distance_correlation(u, w[order], unbiased=True),
        n,
        n_permutations,
        seed,
        "greater",
    )
    return observed, p_value


def coordinate_pearson(u: np.ndarray, w: np.ndarray, bins: int = 20) -> dict[str, Any]:
    """Per-coordinate Pearson correlation over time of two ``[n, D]`` update sets (see above).

    Returns ``{"weighted_mean", "pooled", "n_coordinates", "histogram": {"edges", "counts"}}``;
    empty below ``MIN_PAIRS["pearson_per_coordinate"]`` pairs. ``r_d`` by
    :func:`scipy.stats.pearsonr` (``axis=0``) on coordinates that move in both models.
    """
    n, d = u.shape
    edges = np.linspace(-1.0, 1.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    num = den = pooled_uw = pooled_uu = pooled_ww = 0.0
    used = 0
    if n >= MIN_PAIRS["pearson_per_coordinate"]:
        for start in range(0, d, 1 << 16):
            a = np.asarray(u[:, start : start + (1 << 16)], np.float64)
            b = np.asarray(w[:, start : start + (1 << 16)], np.float64)
            a, b = a - a.mean(axis=0), b - b.mean(axis=0)
            uw, uu, ww = (a * b).sum(0), (a * a).sum(0), (b * b).sum(0)
            pooled_uw, pooled_uu, pooled_ww = (
                pooled_uw + uw.sum(),
                pooled_uu + uu.sum(),
                pooled_ww + ww.sum(),
            )
            ok = (uu > _TINY) & (ww > _TINY)
            if not ok.any():
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", stats.NearConstantInputWarning)
                r = stats.pearsonr(a[:, ok], b[:, ok], axis=0).statistic
            weight = uu[ok] + ww[ok]
            num, den, used = num + float(r @ weight), den + float(weight.sum()), used + r.size
            counts += np.histogram(r, bins=edges)[0]
    pooled_den = math.sqrt(pooled_uu * pooled_ww)
    return {
        "weighted_mean": _json(num / den) if den > 0 else None,
        "pooled": _json(pooled_uw / pooled_den) if pooled_den > _TINY else None,
        "n_coordinates": used,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def analyse(
    trajectories: Trajectories | Mapping[str, np.ndarray],
    offset: int = 0,
    *,
    k: int | None = None,
    window: int | None = None,
    pairing: str = "auto",
    procrustes_k: int = 3,
    n_permutations: int = 199,
    seed: int = 0,
) -> dict[str, Any]:
    """All interplay metrics of a run as a JSON-serialisable dict (see the module docstring).

    ``trajectories`` needs a ``"policy"`` and a ``"reward"`` trajectory (bare ``[n, D]``
    arrays are accepted). ``k``: cap on the shared reduced dimension (``None``: exact).
    ``window``: pairs per distance-correlation window (``None``: cumulative).
    ``procrustes_k``: dims of each model's PCA for Procrustes. ``n_permutations`` / ``seed``:
    the permutation baselines.
    """
    if not isinstance(trajectories, Trajectories):
        trajectories = Trajectories.from_arrays(**trajectories)
    if trajectories.policy is None or trajectories.reward is None:
        raise ValueError(
            "the interplay analysis needs both policy and reward snapshots; "
            f"found only {sorted(trajectories.models)}"
        )
    least = MIN_PAIRS["distance_correlation"]
    if window is not None and window < least:
        raise ValueError(
            f"window must be >= {least} pairs (or None for cumulative), got {window}: the "
            f"bias-corrected distance correlation of fewer pairs is likelier +-1 than 0 by chance"
        )
    pol, rew = trajectories.policy, trajectories.reward
    pairs = pair_updates(pol, rew, offset, pairing)
    n = pairs.policy.shape[0]
    notes = [pairs.note]
    out: dict[str, Any] = {
        "offset": offset,
        "pairing": pairs.pairing,
        "space": pairs.space,
        "n_pairs": n,
        "min_pairs": dict(MIN_PAIRS),
        "unavailable": {
            name: why
            for name in MIN_PAIRS
            if (why := unavailable(name, n, pairs.space)) is not None
        },
        "policy_dim": pol.dim,
        "reward_dim": rew.dim,
        "pairs": [
            {
                "policy_step": int(pol.steps[i]),
                "policy_iteration": int(pol.iterations[i]),
                "reward_step": int(rew.steps[j]),
                "reward_iteration": int(rew.iterations[j]),
            }
            for i, j in zip(pairs.policy_end, pairs.reward_end, strict=True)
        ],
    }
    notes += [f"{name.replace('_', ' ')} {why}" for name, why in out["unavailable"].items()]
    if n == 0:
        notes.append(f"no update pairs with offset {offset}: too few snapshots")
        return out | {"k": 0, "notes": notes}
    u, w, kept = reduce_pair(pairs, k)
    out["k"], out["energy_kept"] = int(u.shape[1]), _json(kept)
    proc = procrustes_test(pairs.policy, pairs.reward, procrustes_k, n_permutations, seed)
    if proc["disparity"] is None and "procrustes" not in out["unavailable"]:
        notes.append("Procrustes undefined: a model's updates have no spread")
    out["procrustes_disparity"] = proc["disparity"]
    out["procrustes"] = proc
    shared = pairs.space != "separate"
    out["angle_updates_deg"] = [
        _json(angle_deg(a, b)) if shared else None for a, b in zip(u, w, strict=True)
    ]
    out["angle_velocities_deg"] = [None] + [
        _json(angle_deg(u[i] - u[i - 1], w[i] - w[i - 1])) if shared else None
        for i in range(1, n)
    ]
    starts = [0 if window is None else max(0, i - window + 1) for i in range(n)]
    per_step = [
        _json(distance_correlation(u[s : i + 1], w[s : i + 1], unbiased=True))
        if i + 1 - s >= least
        else None
        for i, s in enumerate(starts)
    ]
    overall, p_value = dcor_test(u, w, n_permutations, seed)
    out["distance_correlation"] = {
        "estimator": "bias-corrected dCor^2 (U-centred)",
        "window": window,
        "per_step": per_step,
        "overall": _json(overall),
        "p_value": _json(p_value),
        "overall_v_statistic": _json(distance_correlation(u, w)),
    }
    norms_u = np.linalg.norm(pairs.policy.astype(np.float64), axis=1)
    norms_w = np.linalg.norm(pairs.reward.astype(np.float64), axis=1)
    none = np.zeros((n, 0))  # no coordinate to correlate without shared coordinates
    coords = coordinate_pearson(pairs.policy if shared else none, pairs.reward if shared else none)
    r_norms, p_norms = (
        pearson_test(norms_u, norms_w) if n >= MIN_PAIRS["pearson"] else (math.nan, math.nan)
    )
    out["pearson"] = {
        "update_norms": _json(r_norms),
        "update_norms_p_value": _json(p_norms),
        "per_coordinate": coords,
    }
    out["update_norms"] = {"policy": norms_u.tolist(), "reward": norms_w.tolist()}
    out["notes"] = notes
    return out
