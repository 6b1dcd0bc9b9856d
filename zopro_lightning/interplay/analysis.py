"""Policy-reward interplay metrics of a run, per update pair and overall (:func:`analyse`).

The updates of the two trajectories are computed and paired by :mod:`.pairing` (notation
``u_i`` policy, ``w_i`` reward, i = 0..n-1), reduced to a common dimension by
:mod:`.reduction`, and measured with :mod:`.statistics` and :mod:`.significance`; a
statistic with too few pairs, or one that needs coordinates the models do not share, is
``None`` and ``unavailable[name]`` says why (:mod:`.undefined`).

**Metrics** (on the n paired reduced updates ``u_i``, ``w_i``):

* ``procrustes``: :func:`scipy.spatial.procrustes` of the two update trajectories, each
  reduced by its own centred PCA to ``k = min(procrustes_k, n - 2)`` dims (default 3): after
  centring, scaling to unit Frobenius norm and the best rotation/reflection,
  ``disparity = sum ||U' - W'||^2`` in [0, 1]; 0 = the same shape. A permutation baseline
  over the orders of the reward rows gives the disparity expected by chance and a one-sided
  p-value (small disparity = significant; :mod:`.significance`).
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
  last ``window`` pairs. Over all pairs with a one-sided permutation p-value.
* ``pearson``: :func:`scipy.stats.pearsonr` over time (i) of the update norms ``||u_i||`` vs
  ``||w_i||`` (do both models move a lot at the same times? with pearsonr's two-sided
  t-test p-value) and (ii) per coordinate d of the shared space (a parameter, or a sketch
  bucket), ``r_d = corr_i(u_{i,d}, w_{i,d})`` (does a parameter move the same way in both
  models at the same times?). (ii) is taken on the full common-space updates, not the joint
  basis (whose minor directions are fitted to the two sets together, which builds
  correlations of +-1 into them); not reported without shared coordinates. Summaries: the
  mean of ``r_d`` weighted by each coordinate's energy ``sum_i (u~_id^2 + w~_id^2)``
  (tilde: centred over time), the pooled ``sum u~ w~ / sqrt(sum u~^2 sum w~^2)`` over all
  (i, d), and a histogram of ``r_d``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .pairing import PairedUpdates, pair_updates
from .reduction import reduce_pair
from .significance import dcor_test, procrustes_test
from .statistics import angle_deg, coordinate_pearson, distance_correlation, pearson_test
from .trajectory import Trajectories, Trajectory
from .undefined import MIN_PAIRS, json_float, unavailable


def _both_models(
    trajectories: Trajectories | Mapping[str, np.ndarray], window: int | None
) -> tuple[Trajectory, Trajectory]:
    """The policy and reward trajectories; ``ValueError`` if one is missing or ``window`` is
    below ``MIN_PAIRS["distance_correlation"]``."""
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
    return trajectories.policy, trajectories.reward


def _description(pol: Trajectory, rew: Trajectory, pairs: PairedUpdates) -> dict[str, Any]:
    """What was paired: sizes, pairing, space, the n/a statistics and each pair's snapshots."""
    n = pairs.policy.shape[0]
    return {
        "offset": pairs.offset,
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


def _angles(u: np.ndarray, w: np.ndarray, shared: bool) -> dict[str, list[float | None]]:
    """``angle(u_i, w_i)`` and ``angle(u_i - u_{i-1}, w_i - w_{i-1})`` (``None`` at i = 0), in
    degrees; all ``None`` without shared coordinates."""
    n = u.shape[0]
    return {
        "angle_updates_deg": [
            json_float(angle_deg(a, b)) if shared else None for a, b in zip(u, w, strict=True)
        ],
        "angle_velocities_deg": [None]
        + [
            json_float(angle_deg(u[i] - u[i - 1], w[i] - w[i - 1])) if shared else None
            for i in range(1, n)
        ],
    }


def _distance_correlations(
    u: np.ndarray, w: np.ndarray, window: int | None, n_permutations: int, seed: int
) -> dict[str, Any]:
    """Bias-corrected dCor^2 per step i (pairs ``s..i``, ``s = 0`` or ``i - window + 1``;
    ``None`` below ``MIN_PAIRS["distance_correlation"]`` pairs), over all pairs with its
    permutation p-value, and the V-statistic dCor over all pairs."""
    n, least = u.shape[0], MIN_PAIRS["distance_correlation"]
    starts = [0 if window is None else max(0, i - window + 1) for i in range(n)]
    per_step = [
        json_float(distance_correlation(u[s : i + 1], w[s : i + 1], unbiased=True))
        if i + 1 - s >= least
        else None
        for i, s in enumerate(starts)
    ]
    overall, p_value = dcor_test(u, w, n_permutations, seed)
    return {
        "estimator": "bias-corrected dCor^2 (U-centred)",
        "window": window,
        "per_step": per_step,
        "overall": json_float(overall),
        "p_value": json_float(p_value),
        "overall_v_statistic": json_float(distance_correlation(u, w)),
    }


def _pearson(pairs: PairedUpdates) -> dict[str, Any]:
    """Pearson r of the update norms ``||u_i||`` vs ``||w_i||`` (with its p-value), the
    per-coordinate r on the full common-space updates, and the norms themselves."""
    n = pairs.policy.shape[0]
    shared = pairs.space != "separate"
    norms_u = np.linalg.norm(pairs.policy.astype(np.float64), axis=1)
    norms_w = np.linalg.norm(pairs.reward.astype(np.float64), axis=1)
    none = np.zeros((n, 0))  # no coordinate to correlate without shared coordinates
    coords = coordinate_pearson(pairs.policy if shared else none, pairs.reward if shared else none)
    r_norms, p_norms = (
        pearson_test(norms_u, norms_w) if n >= MIN_PAIRS["pearson"] else (math.nan, math.nan)
    )
    return {
        "pearson": {
            "update_norms": json_float(r_norms),
            "update_norms_p_value": json_float(p_norms),
            "per_coordinate": coords,
        },
        "update_norms": {"policy": norms_u.tolist(), "reward": norms_w.tolist()},
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
    arrays are accepted). ``offset``: pair reward update t with policy update ``t + offset``.
    ``k``: cap on the shared reduced dimension (``None``: exact). ``window``: pairs per
    distance-correlation window (``None``: cumulative). ``pairing``: ``"iteration"``,
    ``"index"`` or ``"auto"`` (:mod:`.pairing`). ``procrustes_k``: dims of each model's PCA
    for Procrustes. ``n_permutations`` / ``seed``: the permutation baselines.
    """
    pol, rew = _both_models(trajectories, window)
    pairs = pair_updates(pol, rew, offset, pairing)
    n = pairs.policy.shape[0]
    out = _description(pol, rew, pairs)
    notes = [pairs.note]
    notes += [f"{name.replace('_', ' ')} {why}" for name, why in out["unavailable"].items()]
    if n == 0:
        notes.append(f"no update pairs with offset {offset}: too few snapshots")
        return out | {"k": 0, "notes": notes}
    u, w, kept = reduce_pair(pairs, k)
    out["k"], out["energy_kept"] = int(u.shape[1]), json_float(kept)
    proc = procrustes_test(pairs.policy, pairs.reward, procrustes_k, n_permutations, seed)
    if proc["disparity"] is None and "procrustes" not in out["unavailable"]:
        notes.append("Procrustes undefined: a model's updates have no spread")
    out["procrustes_disparity"] = proc["disparity"]
    out["procrustes"] = proc
    out |= _angles(u, w, pairs.space != "separate")
    out["distance_correlation"] = _distance_correlations(u, w, window, n_permutations, seed)
    out |= _pearson(pairs)
    out["notes"] = notes
    return out
