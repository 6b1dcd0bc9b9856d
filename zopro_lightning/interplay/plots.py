"""Every figure of a run's interplay analysis, written to disk (:func:`render`).

Files written under ``out_dir`` (``RUN_DIR/plots``):

* ``trajectory_<method>_<2|3>d.png``: one per projection (named by the method asked
  for; the title says if it fell back to PCA), drawn by :mod:`.trajectory_plots`;
* ``metrics.png``: angles, distance correlation per step, update norms and per-coordinate
  Pearson correlations against the update pair, drawn by :mod:`.metrics_plots`; a statistic
  with fewer pairs than its minimum (:data:`.undefined.MIN_PAIRS`) is not drawn, the panel
  says "n/a: 4 pairs, needs >= 5" instead;
* ``interplay.html``: every figure, interactive (plotly, hover shows step / iteration /
  phase), with plotly.js inlined once, so the file opens offline and can be moved alone
  (:mod:`.html_report`).

:func:`trajectory_png` and :func:`metrics_png` draw one PNG each (the notebook imports them
from here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .html_report import report_html
from .metrics_plots import metrics_figure, metrics_png
from .plot_style import projection_title
from .projections import Projection
from .trajectory import Trajectories
from .trajectory_plots import trajectory_figure, trajectory_png

__all__ = ["metrics_png", "render", "trajectory_png"]


def render(
    trajectories: Trajectories,
    projections: Sequence[Projection],
    result: dict[str, Any] | None,
    out_dir: Path,
    *,
    html_report: bool = True,
) -> list[Path]:
    """Write every PNG (and the HTML report) under ``out_dir``; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        trajectory_png(p, trajectories, out_dir / f"trajectory_{p.requested}_{p.dims}d.png")
        for p in projections
    ]
    with_metrics = result is not None and result.get("n_pairs")
    if with_metrics:
        written.append(metrics_png(result, out_dir / "metrics.png"))
    if html_report:
        figures = [
            (projection_title(p).replace("\n", " - "), trajectory_figure(p, trajectories))
            for p in projections
        ]
        if with_metrics:
            figures.append(("Per-step metrics", metrics_figure(result)))
        written.append(report_html(figures, result, out_dir / "interplay.html"))
    return written
