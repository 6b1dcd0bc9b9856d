"""Statistics of two paired update sets: angles, distance correlation and Pearson correlation.

Rows ``u_i``, ``w_i`` (i = 0..n-1) are paired updates of the policy and the reward model.
Every function returns ``nan`` (or ``None`` in a dict meant for JSON) where its value is
undefined; the least number of pairs for a value worth reporting is :data:`.undefined.MIN_PAIRS`.

* :func:`angle_deg`: ``angle(a, b) = 2 atan2(||a^ - b^||, ||a^ + b^||)`` with
  ``a^ = a / ||a||`` (accurate near 0 and 180 degrees, unlike ``acos`` of the cosine).
* :func:`distance_correlation`: dCor of the samples ``{(x_i, y_i)}`` (Szekely, Rizzo &
  Bakirov 2007) from the double-centred distance matrices, or the bias-corrected estimate of
  dCor^2 from the U-centred ones (Szekely & Rizzo 2014).
* :func:`pearson` / :func:`pearson_test`: ``r = sum x~ y~ / sqrt(sum x~^2 sum y~^2)``
  (tilde: centred) of two series, with the two-sided t-test p-value of
  :func:`scipy.stats.pearsonr`.
* :func:`coordinate_pearson`: ``r_d = corr_i(u_{i,d}, w_{i,d})`` for every coordinate d,
  summarised by an energy-weighted mean, a pooled r and a histogram.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from .undefined import MIN_PAIRS, json_float

_TINY = 1e-30
_CHUNK = 1 << 16  # coordinates per block of the per-coordinate Pearson correlation


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors in degrees, ``nan`` if either is zero."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na <= _TINY or nb <= _TINY:
        return math.nan
    ua, ub = np.asarray(a, np.float64) / na, np.asarray(b, np.float64) / nb
    return math.degrees(2.0 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def _distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix ``a_ij = ||x_i - x_j||`` of the rows of x."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    sq = np.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _double_centre(a: np.ndarray) -> np.ndarray:
    """``A_ij = a_ij - mean_i a_ij - mean_j a_ij + mean a``."""
    return a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True) + a.mean()


def _u_centre(a: np.ndarray) -> np.ndarray:
    """U-centring: ``A~_ij = a_ij - a_i. / (n-2) - a_.j / (n-2) + a_.. / ((n-1)(n-2))``
    off the diagonal (dots: sums), ``A~_ii = 0``."""
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


class _CoordinateSums:
    """Running sums of :func:`coordinate_pearson` over blocks of coordinates."""

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = edges
        self.counts = np.zeros(len(edges) - 1, dtype=np.int64)
        self.num = self.den = 0.0  # sum_d r_d e_d, sum_d e_d
        self.uw = self.uu = self.ww = 0.0  # pooled sum u~ w~, sum u~^2, sum w~^2
        self.used = 0

    def add(self, u: np.ndarray, w: np.ndarray) -> None:
        """Centre one ``[n, block]`` pair over time and add its coordinates."""
        a = np.asarray(u, np.float64)
        b = np.asarray(w, np.float64)
        a, b = a - a.mean(axis=0), b - b.mean(axis=0)
        uw, uu, ww = (a * b).sum(0), (a * a).sum(0), (b * b).sum(0)
        self.uw, self.uu, self.ww = self.uw + uw.sum(), self.uu + uu.sum(), self.ww + ww.sum()
        ok = (uu > _TINY) & (ww > _TINY)  # coordinates that move in both models
        if not ok.any():
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.NearConstantInputWarning)
            r = stats.pearsonr(a[:, ok], b[:, ok], axis=0).statistic
        weight = uu[ok] + ww[ok]
        self.num, self.den = self.num + float(r @ weight), self.den + float(weight.sum())
        self.used += r.size
        self.counts += np.histogram(r, bins=self.edges)[0]

    def summary(self) -> dict[str, Any]:
        pooled_den = math.sqrt(self.uu * self.ww)
        return {
            "weighted_mean": json_float(self.num / self.den) if self.den > 0 else None,
            "pooled": json_float(self.uw / pooled_den) if pooled_den > _TINY else None,
            "n_coordinates": self.used,
            "histogram": {"edges": self.edges.tolist(), "counts": self.counts.tolist()},
        }


def coordinate_pearson(u: np.ndarray, w: np.ndarray, bins: int = 20) -> dict[str, Any]:
    """Per-coordinate Pearson correlation over time of two ``[n, D]`` update sets.

    ``r_d = corr_i(u_{i,d}, w_{i,d})`` by :func:`scipy.stats.pearsonr` (``axis=0``) on the
    coordinates that move in both models. Returns ``{"weighted_mean", "pooled",
    "n_coordinates", "histogram": {"edges", "counts"}}``: the mean of ``r_d`` weighted by
    ``e_d = sum_i (u~_id^2 + w~_id^2)`` (tilde: centred over time), the pooled
    ``sum u~ w~ / sqrt(sum u~^2 sum w~^2)`` over all (i, d), and a histogram of ``r_d`` on
    ``bins`` equal bins of [-1, 1]; empty below ``MIN_PAIRS["pearson_per_coordinate"]`` pairs.
    """
    n, d = u.shape
    sums = _CoordinateSums(np.linspace(-1.0, 1.0, bins + 1))
    if n >= MIN_PAIRS["pearson_per_coordinate"]:
        for start in range(0, d, _CHUNK):
            sums.add(u[:, start : start + _CHUNK], w[:, start : start + _CHUNK])
    return sums.summary()
