"""2-D / 3-D embeddings of the trajectories: PCA, t-SNE and UMAP.

Every method starts from an exact linear reduction: the centred points ``X - mean`` of
n snapshots span at most n - 1 dimensions, so their coordinates in the top principal
directions (from the n x n Gram matrix) keep every pairwise distance; t-SNE and UMAP then
run on those few columns instead of D.

**Joint or separate** (``mode``):

* ``"joint"``: one embedding of both models on the same axes. Needs coordinates the two
  models share (:func:`.trajectory.common_space`). Each trajectory is taken as its
  displacement from its own first snapshot (``theta_i - theta_0``, ``phi_i - phi_0``), so
  both start at the origin and the axes show directions of movement shared by the two; with
  ``normalise=True`` each is divided by its RMS displacement norm, so a model that moves
  10x less is still visible (directions and shapes are kept, relative scale is not).
* ``"separate"``: each model embedded alone (its own axes; compare shapes, not positions).
* ``"auto"``: joint when possible, otherwise separate.

**Few points.** PCA with fewer points than dimensions pads with zero axes. t-SNE needs
``perplexity < n``: we use ``min(30, (n - 1) / 3)``, and fall back to PCA below 4 points.
UMAP uses ``n_neighbors = min(15, n - 1)`` and PCA initialisation, and falls back to PCA
below 5 points or if it fails. Every fallback is a ``UserWarning`` and a note.

**Extrapolation.** ``extrapolate=m`` continues each embedded trajectory by m points along
the least-squares line through its last ``fit_last`` points (against the snapshot index).
It is done in the embedded coordinates: for PCA that equals extrapolating in parameter
space and projecting (the map is linear); for t-SNE/UMAP it is only a visual guide.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .reduction import gram_coordinates
from .trajectory import CommonSpace, Trajectories, common_space

METHODS = ("pca", "tsne", "umap")


@dataclass(frozen=True)
class Projection:
    """Embedded trajectories: ``coords[model]`` is ``[n_model, dims]`` in snapshot order."""

    method: str
    requested: str
    dims: int
    mode: str
    coords: dict[str, np.ndarray]
    axis_labels: dict[str, tuple[str, ...]]
    extrapolated: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _fallback(notes: list[str], message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
    notes.append(message)


def _pca(points: np.ndarray, dims: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Centred PCA coordinates ``[n, dims]`` (zero-padded) and 'PCj (v %)' labels."""
    n = points.shape[0]
    if n == 0:
        return np.zeros((0, dims)), tuple(f"PC{j + 1}" for j in range(dims))
    centred = points - points.mean(axis=0, keepdims=True, dtype=np.float64)
    coords, _ = gram_coordinates(centred, None)
    var = np.sum(coords**2, axis=0)
    total = float(var.sum())
    out = np.zeros((n, dims))
    r = min(dims, coords.shape[1])
    out[:, :r] = coords[:, :r]
    labels = tuple(
        f"PC{j + 1} ({100 * var[j] / total:.0f} % var.)" if j < r and total > 0 else f"PC{j + 1}"
        for j in range(dims)
    )
    return out, labels


def embed(
    points: np.ndarray,
    method: str = "pca",
    dims: int = 2,
    seed: int = 0,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, tuple[str, ...], str]:
    """Embed ``[n, D]`` points in ``dims`` dims; returns (coords, axis labels, method used)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    notes = [] if notes is None else notes
    n = points.shape[0]
    if method == "tsne" and n < 4:
        _fallback(notes, f"t-SNE needs >= 4 points, got {n}: PCA used instead")
        method = "pca"
    if method == "umap" and n < 5:
        _fallback(notes, f"UMAP needs >= 5 points, got {n}: PCA used instead")
        method = "pca"
    if method == "pca":
        coords, labels = _pca(points, dims)
        return coords, labels, "pca"
    reduced, _ = gram_coordinates(
        points - points.mean(axis=0, keepdims=True, dtype=np.float64), None
    )
    if method == "tsne":
        from sklearn.manifold import TSNE

        # the PCA start needs ``dims`` directions of spread; points spanning fewer (a short
        # run) start from a seeded random layout instead
        start = "pca" if min(reduced.shape) >= dims else "random"
        tsne = TSNE(
            n_components=dims,
            perplexity=min(30.0, (n - 1) / 3.0),
            init=start,
            learning_rate="auto",
            random_state=seed,
            method="exact" if n <= 500 else "barnes_hut",
        )
        return tsne.fit_transform(reduced), tuple(f"t-SNE {j + 1}" for j in range(dims)), method
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap

            model = umap.UMAP(
                n_components=dims,
                n_neighbors=max(2, min(15, n - 1)),
                init="pca",
                random_state=seed,
                min_dist=0.1,
            )
            coords = model.fit_transform(reduced)
    except Exception as err:  # any UMAP failure on odd inputs: fall back to PCA
        _fallback(notes, f"UMAP failed ({type(err).__name__}: {err}): PCA used instead")
        coords, labels = _pca(points, dims)
        return coords, labels, "pca"
    return np.asarray(coords), tuple(f"UMAP {j + 1}" for j in range(dims)), method


def extrapolate_linear(coords: np.ndarray, steps: int, fit_last: int = 3) -> np.ndarray:
    """``steps`` further points on the least-squares line through the last ``fit_last``.

    With points ``c_i`` at times ``i``, fit ``c(i) = a + b i`` on the last m points and return
    ``c(n), ..., c(n + steps - 1)``; empty with fewer than 2 points.
    """
    n = coords.shape[0]
    if steps <= 0 or n < 2:
        return np.zeros((0, coords.shape[1]))
    m = max(2, min(fit_last, n))
    t = np.arange(n - m, n, dtype=np.float64)
    design = np.stack([np.ones(m), t], axis=1)
    coef, *_ = np.linalg.lstsq(design, coords[n - m :], rcond=None)
    future = np.arange(n, n + steps, dtype=np.float64)
    return np.stack([np.ones(steps), future], axis=1) @ coef


def _joint_embedding(
    common: CommonSpace, method: str, dims: int, seed: int, normalise: bool, notes: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, ...]], str]:
    """One embedding of both models' displacements ``x_i - x_0`` (each divided by its RMS
    norm ``sqrt(mean_i ||x_i - x_0||^2)`` when ``normalise``); (coords, labels, method)."""
    parts = []
    for pts in (common.policy, common.reward):
        disp = pts.astype(np.float64) - pts[:1].astype(np.float64)
        rms = float(np.sqrt(np.mean(np.sum(disp**2, axis=1))))
        parts.append(disp / rms if normalise and rms > 0 else disp)
    both, axis, how = embed(np.concatenate(parts), method, dims, seed, notes)
    n_p = parts[0].shape[0]
    notes.append(
        f"joint embedding in {common.kind} coordinates ({common.note}); "
        "displacements from the first snapshot" + (", each scaled to unit RMS" if normalise else "")
    )
    return {"policy": both[:n_p], "reward": both[n_p:]}, {"policy": axis, "reward": axis}, how


def project(
    trajectories: Trajectories,
    method: str = "pca",
    dims: int = 2,
    *,
    mode: str = "auto",
    normalise: bool = True,
    extrapolate: int = 0,
    fit_last: int = 3,
    seed: int = 0,
) -> Projection:
    """Embed the policy and reward trajectories (see the module docstring for the options)."""
    if mode not in ("auto", "joint", "separate"):
        raise ValueError(f"mode must be 'auto', 'joint' or 'separate', got {mode!r}")
    notes: list[str] = []
    pol, rew = trajectories.policy, trajectories.reward
    common = common_space(pol, rew) if pol is not None and rew is not None else None
    if mode == "joint" and common is None:
        _fallback(
            notes,
            "no coordinates shared by policy and reward (or one is missing): "
            "separate embeddings instead of a joint one",
        )
    joint = common is not None and mode in ("auto", "joint")
    coords: dict[str, np.ndarray] = {}
    labels: dict[str, tuple[str, ...]] = {}
    used: list[str] = []
    if joint:
        assert common is not None
        coords, labels, how = _joint_embedding(common, method, dims, seed, normalise, notes)
        used.append(how)
    else:
        for traj in trajectories:
            coords[traj.model], labels[traj.model], how = embed(
                traj.points, method, dims, seed, notes
            )
            used.append(how)
    extra = (
        {m: extrapolate_linear(c, extrapolate, fit_last) for m, c in coords.items()}
        if extrapolate > 0
        else {}
    )
    return Projection(
        method="+".join(sorted(set(used))),
        requested=method,
        dims=dims,
        mode="joint" if joint else "separate",
        coords=coords,
        axis_labels=labels,
        extrapolated=extra,
        notes=notes,
    )
