"""In-memory trajectories of the policy and the reward model, and their common coordinates.

A :class:`Trajectory` is one model's snapshots as a matrix ``X`` of shape ``[n, D]``
(row ``i`` = the flattened trainable tensors at snapshot ``i``, in save order) plus the
metadata written with each snapshot. Columns are the tensors in sorted-name order, each
flattened row-major, unless the snapshots were count-sketched (``projection`` is set;
see :mod:`.sketch`), in which case the columns are sketch buckets.

Policy and reward vectors usually differ in length (the reward model has a score head,
or another base). :func:`common_space` finds coordinates they share:

* ``"shared-parameters"``: both stored raw; the columns of the tensors present in both
  models with the same name and shape (same LoRA layout: every adapter tensor). Inner
  products there are the ones the ZOPrO sampler uses (docs/algorithm.md §2.4).
* ``"shared-sketch"``: both count-sketched with the same seed and dimension; shared names
  hash to the same buckets, so the sketch space is common (the tensors of one model only
  add noise of order ``||x|| ||y|| / sqrt(m)`` to cross inner products).
* otherwise ``None``: no coordinates in common; callers fall back to comparing the two
  models through basis-free quantities or after an optimal rotation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np

MODELS = ("policy", "reward")


@dataclass(frozen=True)
class Trajectory:
    """One model's snapshots. ``points`` is float32 ``[n, D]``; metadata arrays have length n."""

    model: str
    points: np.ndarray
    steps: np.ndarray
    iterations: np.ndarray
    phases: tuple[str, ...]
    fractions: np.ndarray
    files: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    projection: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        n = self.points.shape[0]
        if self.points.ndim != 2:
            raise ValueError(f"{self.model}: points must be [n, D], got {self.points.shape}")
        for label, meta in (
            ("steps", self.steps),
            ("iterations", self.iterations),
            ("phases", self.phases),
            ("fractions", self.fractions),
        ):
            if len(meta) != n:
                raise ValueError(f"{self.model}: {len(meta)} {label} for {n} snapshots")

    @property
    def n(self) -> int:
        return int(self.points.shape[0])

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """Column indices of the given tensors (raw snapshots only), in the order given."""
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = prod(shape)
            offsets[name] = (start, start + size)
            start += size
        return np.concatenate(
            [np.arange(*offsets[name]) for name in names] or [np.zeros(0, dtype=np.int64)]
        )

    @classmethod
    def from_array(
        cls,
        model: str,
        points: np.ndarray,
        *,
        steps: Sequence[int] | None = None,
        iterations: Sequence[int] | None = None,
        phases: Sequence[str] | None = None,
    ) -> Trajectory:
        """A trajectory from a bare ``[n, D]`` array (metadata: 0..n-1, phase ``"-"``)."""
        pts = np.asarray(points, dtype=np.float32)
        if pts.ndim != 2:
            raise ValueError(f"{model}: points must be [n, D], got shape {pts.shape}")
        n = pts.shape[0]
        return cls(
            model=model,
            points=pts,
            steps=np.asarray(range(n) if steps is None else steps, dtype=np.int64),
            iterations=np.asarray(range(n) if iterations is None else iterations, dtype=np.int64),
            phases=tuple(["-"] * n if phases is None else phases),
            fractions=np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n),
        )


@dataclass(frozen=True)
class Trajectories:
    """The trajectories of a run, by model name (``"policy"``, ``"reward"``)."""

    models: Mapping[str, Trajectory]
    run_dir: str | None = None

    @classmethod
    def from_arrays(cls, **arrays: np.ndarray) -> Trajectories:
        """``Trajectories.from_arrays(policy=P, reward=R)`` from bare ``[n, D]`` arrays."""
        return cls({m: Trajectory.from_array(m, a) for m, a in arrays.items()})

    def __getitem__(self, model: str) -> Trajectory:
        return self.models[model]

    def __contains__(self, model: object) -> bool:
        return model in self.models

    def __iter__(self) -> Iterator[Trajectory]:
        return iter(self.models[m] for m in self.models)

    @property
    def policy(self) -> Trajectory | None:
        return self.models.get("policy")

    @property
    def reward(self) -> Trajectory | None:
        return self.models.get("reward")


@dataclass(frozen=True)
class CommonSpace:
    """Policy and reward points restricted to coordinates both share."""

    kind: str
    policy: np.ndarray
    reward: np.ndarray
    note: str


def common_space(policy: Trajectory, reward: Trajectory) -> CommonSpace | None:
    """Coordinates shared by the two models (see the module docstring), or ``None``."""
    if policy.projection is None and reward.projection is None:
        if policy.names and reward.names:
            rshape = dict(zip(reward.names, reward.shapes, strict=True))
            shared = [
                n for n, s in zip(policy.names, policy.shapes, strict=True) if rshape.get(n) == s
            ]
            if shared:
                pc, rc = policy.columns(shared), reward.columns(shared)
                note = (
                    f"{len(shared)} tensors ({pc.size} values) shared by name and shape; "
                    f"policy has {len(policy.names)}, reward {len(reward.names)}"
                )
                return CommonSpace(
                    "shared-parameters", policy.points[:, pc], reward.points[:, rc], note
                )
            return None
        if not policy.names and not reward.names and policy.dim == reward.dim:
            # Bare arrays of equal width (tests, notebooks): taken as the same coordinates.
            return CommonSpace(
                "shared-parameters",
                policy.points,
                reward.points,
                "unnamed arrays of equal width taken as the same coordinates",
            )
        return None
    if policy.projection is not None and reward.projection is not None:
        keys = ("kind", "seed", "dim")
        if all(policy.projection.get(k) == reward.projection.get(k) for k in keys):
            return CommonSpace(
                "shared-sketch",
                policy.points,
                reward.points,
                f"both count-sketched to {policy.dim} dims with the same seed",
            )
    return None
