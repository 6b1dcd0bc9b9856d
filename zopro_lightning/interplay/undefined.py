"""The n/a rule: when an interplay statistic is undefined and how that is reported.

**Least pairs** (:data:`MIN_PAIRS`). Below its minimum number n of update pairs a statistic
is ``None`` in the JSON of :func:`.analysis.analyse`, ``unavailable[name]`` says why
("n/a: 4 pairs, needs >= 5") and the plots print that instead of a value. The minimum is
where the statistic stops being decided by its definition rather than by the data:

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
* update angle, 1 pair; velocity angle, 2 pairs (a difference of two).

**No shared coordinates** (:data:`NEEDS_SHARED_COORDINATES`): the update and velocity
angles and the per-coordinate Pearson r compare coordinates across the models, so they are
not reported at any n when each model is reduced on its own basis (``space="separate"``,
see :mod:`.reduction`).

Other undefined values (zero variance, zero updates) are ``nan`` in the computation and
``None`` in the JSON too (:func:`json_float`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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
    ``space`` (``"n/a: 4 pairs, needs >= 5"``), or ``None`` when it is:
    ``n < MIN_PAIRS[statistic]``, or ``space == "separate"`` for a statistic of
    :data:`NEEDS_SHARED_COORDINATES`."""
    if space == "separate" and statistic in NEEDS_SHARED_COORDINATES:
        return "n/a: no shared coordinates"
    need = MIN_PAIRS[statistic]
    return None if n >= need else f"n/a: {n} pair{'' if n == 1 else 's'}, needs \u2265 {need}"


def why_not(result: Mapping[str, Any], statistic: str) -> str | None:
    """The reason an :func:`.analysis.analyse` ``result`` gives for not reporting
    ``statistic`` (its ``unavailable[statistic]``), ``None`` when it was reported."""
    return (result.get("unavailable") or {}).get(statistic)


def json_float(x: float | None) -> float | None:
    """``x`` as a JSON value: ``None`` for ``None``, ``nan`` or ``+-inf``, else ``float(x)``."""
    return None if x is None or not math.isfinite(x) else float(x)
