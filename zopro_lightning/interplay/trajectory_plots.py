"""Trajectory figures: one projection of :mod:`.projections` as a PNG or a plotly figure.

One panel with both models when the projection is joint (shared axes), one panel per model
when separate. Each model's snapshots are drawn in save order as a line through markers
shaded by time, with its start and end marked and its linear extrapolation dashed
(:mod:`.plot_style`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .plot_style import STYLE, projection_title, shades  # noqa: E402
from .projections import Projection  # noqa: E402
from .trajectory import Trajectories  # noqa: E402


def _panels(proj: Projection) -> list[list[str]]:
    """Models per panel: both in one when joint, one each when separate."""
    models = [m for m in ("policy", "reward") if m in proj.coords]
    return [models] if proj.mode == "joint" else [[m] for m in models]


# ----------------------------------------------------------------------------- matplotlib
def _draw_model(ax: Any, model: str, c: np.ndarray, extra: np.ndarray | None) -> None:
    """One model's path, shaded markers, start star, end X and dashed extrapolation."""
    st = STYLE[model]
    cols = list(c.T)
    ax.plot(*cols, color=st["color"], lw=1.4, alpha=0.7, zorder=1)
    ax.scatter(
        *cols, c=shades(model, len(c)), marker=st["marker"], s=28, edgecolors="none", zorder=2
    )
    if len(c):
        for point, marker, size in ((c[0], "*", 320), (c[-1], "X", 200)):
            ax.scatter(
                *point,
                marker=marker,
                s=size,
                color=st["color"],
                edgecolors="black",
                linewidths=1.0,
                zorder=3,
            )
    if extra is not None and len(extra) and len(c):
        path = np.concatenate([c[-1:], extra])
        ax.plot(*path.T, ls="--", color=st["color"], lw=1.2, zorder=1)
        ax.scatter(
            *extra.T, marker=st["marker"], s=30, facecolors="none", edgecolors=st["color"], zorder=2
        )


def _legend_handles(
    models: Sequence[str], trajectories: Trajectories, extrapolated: bool, joint: bool
) -> list[Line2D]:
    """Legend entries: each model with its snapshot count, start, end, extrapolation."""
    handles = [
        Line2D(
            [],
            [],
            color=STYLE[m]["color"],
            marker=STYLE[m]["marker"],
            label=f"{STYLE[m]['label']} ({trajectories[m].n} snapshots)",
        )
        for m in models
    ]
    start = "start (same point for both)" if joint else "start"
    handles += [
        Line2D([], [], ls="", marker="*", ms=14, color="0.7", mec="black", label=start),
        Line2D([], [], ls="", marker="X", ms=11, color="0.7", mec="black", label="end"),
    ]
    if extrapolated:
        handles.append(Line2D([], [], ls="--", color="0.4", label="linear extrapolation"))
    return handles


def _draw_panel(
    ax: Any, proj: Projection, trajectories: Trajectories, group: list[str], titled: bool
) -> None:
    """The models of one panel, its axis labels, title (``titled``) and legend."""
    for m in group:
        _draw_model(ax, m, proj.coords[m], proj.extrapolated.get(m))
    labels = proj.axis_labels[group[0]]
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if proj.dims == 3:
        ax.set_zlabel(labels[2])
    else:
        ax.grid(alpha=0.3)
    if titled:
        ax.set_title(STYLE[group[0]]["label"], fontsize=11)
    handles = _legend_handles(
        group,
        trajectories,
        bool(proj.extrapolated),
        proj.mode == "joint" and proj.method == "pca",  # linear: both starts coincide
    )
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)


def trajectory_png(proj: Projection, trajectories: Trajectories, path: Path) -> Path:
    """One projection as a PNG (one panel when joint, one per model when separate)."""
    panels = _panels(proj)
    kw = {"projection": "3d"} if proj.dims == 3 else {}
    width = 7.5 if len(panels) == 1 else 13.0
    fig = plt.figure(figsize=(width, 6.2), dpi=120)
    for p, group in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1, **kw)
        _draw_panel(ax, proj, trajectories, group, titled=len(panels) > 1)
    fig.suptitle(projection_title(proj), fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- plotly
def _hover(trajectories: Trajectories, model: str) -> list[str]:
    """Hover text per snapshot: index, step, iteration, phase and fraction of training."""
    t = trajectories[model]
    return [
        f"{model} #{i}<br>step {t.steps[i]}, iteration {t.iterations[i]}<br>"
        f"phase {t.phases[i]}, fraction {t.fractions[i]:.3f}"
        for i in range(t.n)
    ]


def _xyz(a: np.ndarray, dims: int) -> dict[str, Any]:
    """Columns of ``[n, dims]`` points as plotly's ``x``, ``y`` (and ``z``) arguments."""
    return {k: a[:, j] for j, k in enumerate(("x", "y", "z")[:dims])}


def _model_traces(proj: Projection, trajectories: Trajectories, m: str) -> list[Any]:
    """Plotly traces of one model: path with shaded markers, start, end, extrapolation."""
    import plotly.graph_objects as go

    st, c, flat = STYLE[m], proj.coords[m], proj.dims == 2
    scatter = go.Scatter if flat else go.Scatter3d
    hover = _hover(trajectories, m)
    colours = [
        f"rgba({r * 255:.0f},{g * 255:.0f},{b * 255:.0f},{a:.2f})"
        for r, g, b, a in shades(m, len(c))
    ]
    symbol = st["plotly_marker"] if flat else ("circle" if m == "policy" else "diamond")
    traces = [
        scatter(
            **_xyz(c, proj.dims),
            mode="lines+markers",
            name=st["label"],
            legendgroup=m,
            text=hover,
            hoverinfo="text",
            line={"color": st["color"], "width": 3},
            marker={"color": colours, "symbol": symbol, "size": 8 if flat else 4},
        )
    ]
    for idx, sym, sym3, label in ((0, "star", "diamond-open", "start"), (-1, "x", "x", "end")):
        if not len(c):
            continue
        traces.append(
            scatter(
                **_xyz(c[[idx]], proj.dims),
                mode="markers",
                name=f"{st['label']} {label}",
                legendgroup=m,
                text=[hover[idx]],
                hoverinfo="text",
                marker={
                    "color": st["color"],
                    "symbol": sym if flat else sym3,
                    "size": 18 if flat else 9,
                    "line": {"color": "black", "width": 1.5},
                },
            )
        )
    extra = proj.extrapolated.get(m)
    if extra is not None and len(extra) and len(c):
        traces.append(
            scatter(
                **_xyz(np.concatenate([c[-1:], extra]), proj.dims),
                mode="lines+markers",
                name=f"{st['label']} extrapolation",
                legendgroup=m,
                line={"color": st["color"], "dash": "dash"},
                marker={"color": st["color"], "size": 4},
            )
        )
    return traces


def _axis_titles(fig: Any, proj: Projection, labels: Sequence[str], col: int) -> None:
    """Axis titles of subplot ``col`` (a 3-D scene or 2-D axes)."""
    if proj.dims == 3:
        scene = "scene" if col == 1 else f"scene{col}"
        fig.layout[scene].update(
            xaxis_title=labels[0], yaxis_title=labels[1], zaxis_title=labels[2]
        )
    else:
        fig.update_xaxes(title_text=labels[0], row=1, col=col)
        fig.update_yaxes(title_text=labels[1], row=1, col=col)


def trajectory_figure(proj: Projection, trajectories: Trajectories) -> Any:
    """The projection as a plotly figure (subplots per model when separate)."""
    from plotly.subplots import make_subplots

    groups = _panels(proj)
    spec = {"type": "scene"} if proj.dims == 3 else {"type": "xy"}
    fig = make_subplots(
        rows=1,
        cols=len(groups),
        specs=[[spec] * len(groups)],
        subplot_titles=None if len(groups) == 1 else [STYLE[g[0]]["label"] for g in groups],
    )
    for col, group in enumerate(groups, start=1):
        for m in group:
            for trace in _model_traces(proj, trajectories, m):
                fig.add_trace(trace, row=1, col=col)
        _axis_titles(fig, proj, proj.axis_labels[group[0]], col)
    fig.update_layout(
        title=projection_title(proj).replace("\n", "<br>"), height=600, template="plotly_white"
    )
    return fig
