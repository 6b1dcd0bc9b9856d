"""Updates of the policy and reward trajectories, and which update of one meets which of the other.

Notation: policy snapshots ``theta_0..``, reward snapshots ``phi_0..``; updates
``u = theta_b - theta_a`` and ``w = phi_b - phi_a`` between consecutive key snapshots.

``pairing="iteration"`` uses, per model, the first snapshot and the last snapshot of every
iteration, so update t is the whole move of iteration t: ``mu_t = theta_t - theta_{t-1}``
and ``v_t = phi_{t+1} - phi_t`` as in docs/algorithm.md §2 (intra-iteration snapshots only
feed the trajectory plots). ``pairing="index"`` uses the row differences of every snapshot,
update i of one model against update i of the other. ``"auto"`` (default) takes
``"iteration"`` when it yields at least 2 pairs, else ``"index"``. ``offset`` pairs reward
update t with policy update ``t + offset``: ``offset=1`` asks whether the reward refinement
of iteration t is reflected in the policy learning of iteration t+1 (ZOPrO's sampler builds
on exactly that reward update).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trajectory import Trajectory, common_space


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


@dataclass(frozen=True)
class _Matching:
    """Key snapshots of both models and the update indices paired: ``policy_updates[j]``
    (an index into the policy's updates) meets ``reward_updates[j]``."""

    policy_keys: list[int]
    reward_keys: list[int]
    policy_updates: list[int]
    reward_updates: list[int]


def _match(policy: Trajectory, reward: Trajectory, pairing: str, offset: int) -> _Matching:
    """Pair reward update labelled t with the policy update labelled ``t + offset``."""
    pk, pl = update_keypoints(policy.iterations, pairing)
    rk, rl = update_keypoints(reward.iterations, pairing)
    p_of = {label: j for j, label in enumerate(pl)}
    pi, ri = [], []
    for j, label in enumerate(rl):
        if label + offset in p_of:
            ri.append(j)
            pi.append(p_of[label + offset])
    return _Matching(pk, rk, pi, ri)


def _updates(points: np.ndarray, keys: list[int], chosen: list[int]) -> np.ndarray:
    """The chosen updates ``points[keys[i + 1]] - points[keys[i]]`` as rows."""
    return np.diff(points[keys], axis=0)[chosen] if chosen else np.zeros((0, points.shape[1]))


def pair_updates(
    policy: Trajectory, reward: Trajectory, offset: int = 0, pairing: str = "auto"
) -> PairedUpdates:
    """Compute both models' updates and pair reward update t with policy update t+offset."""
    common = common_space(policy, reward)
    p_pts = common.policy if common else policy.points
    r_pts = common.reward if common else reward.points
    kind = pairing
    if pairing == "auto":
        kind = "iteration"
        if len(_match(policy, reward, "iteration", offset).policy_updates) < 2:
            kind = "index"
    match = _match(policy, reward, kind, offset)
    return PairedUpdates(
        policy=_updates(p_pts, match.policy_keys, match.policy_updates),
        reward=_updates(r_pts, match.reward_keys, match.reward_updates),
        space=common.kind if common else "separate",
        pairing=kind,
        offset=offset,
        policy_end=[match.policy_keys[i + 1] for i in match.policy_updates],
        reward_end=[match.reward_keys[j + 1] for j in match.reward_updates],
        note=common.note if common else "no shared coordinates: each model on its own basis",
    )
