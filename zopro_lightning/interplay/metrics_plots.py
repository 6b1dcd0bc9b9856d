"""Metrics figures: the result of :func:`.analysis.analyse` as 2 x 2 panels (PNG or plotly).

Panels, each against the update pair t (reward update t with policy update ``t + offset``):
the angles ``angle(u_t, w_t)`` and ``angle(u_t - u_{t-1}, w_t - w_{t-1})`` in degrees; the
bias-corrected distance correlation dCor^2 per step, with its value over all pairs; the update
norms ``||u_t||`` and ``||w_t||`` (log scale when they span more than 30x) with their Pearson
r; and the histogram of the per-coordinate Pearson ``r_d`` with its energy-weighted mean and
pooled value. The title gives the Procrustes disparity against its permutation baseline. A
statistic with fewer pairs than its minimum (:data:`.undefined.MIN_PAIRS`) is not drawn: the
panel says "n/a: 4 pairs, needs >= 5" instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .plot_style import STYLE  # noqa: E402
from .undefined import why_not  # noqa: E402


def _series(values: Sequence[float | None]) -> np.ndarray:
    """JSON values as a float array, ``None`` as ``nan`` (a gap in the line)."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _say_na(ax: Any, text: str) -> None:
    """Write why a panel has no value in its middle, instead of drawing one."""
    ax.text(
        0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
        color="0.35", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"},
    )  # fmt: skip


def _angle_panel(ax: Any, result: dict[str, Any], n: int) -> None:
    """Update and velocity angles in degrees (0..180, 90 dotted), or why they are n/a."""
    x = np.arange(n)
    na_updates = why_not(result, "angle_updates")
    na_velocities = why_not(result, "angle_velocities")
    if n and not na_updates:
        ax.plot(
            x, _series(result["angle_updates_deg"]), "o-", color="#444", label="updates (u_t, w_t)"
        )
    if n and not na_velocities:
        ax.plot(
            x,
            _series(result["angle_velocities_deg"]),
            "s--",
            color="#8a3ab9",
            label="velocities (u_t-u_t-1, w_t-w_t-1)",
        )
    missing = [
        f"{what} {why}"
        for what, why in (("updates", na_updates), ("velocities", na_velocities))
        if why
    ]
    if na_updates and na_updates == na_velocities:
        missing = [f"angles {na_updates}"]
    if missing:
        _say_na(ax, "\n".join(missing))
    if n:
        ax.set_xlim(-0.3, max(n - 1, 1) + 0.3)
    ax.axhline(90, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(0, 180)
    ax.set_yticks([0, 45, 90, 135, 180])
    ax.set_ylabel("angle (degrees)")
    ax.set_title("Angle between policy and reward updates")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _draw_dcor(ax: Any, result: dict[str, Any], n: int) -> float:
    """dCor^2 per step and over all pairs (dashed, with its permutation p); returns the
    lowest value drawn (for the y range), ``inf`` when none."""
    dc = result["distance_correlation"]
    steps = _series(dc["per_step"])
    how = "cumulative" if dc["window"] is None else f"window of {dc['window']} pairs"
    need = (result.get("min_pairs") or {}).get("distance_correlation")
    how += f", from {need} pairs" if need and dc["window"] is None else ""
    ax.plot(np.arange(n), steps, "o-", color="#2a9d8f", label=f"per step ({how})")
    if dc["overall"] is not None:
        p = dc.get("p_value")
        ax.axhline(
            dc["overall"],
            color="#2a9d8f",
            ls="--",
            lw=1,
            label=f"all pairs: {dc['overall']:.3f}"
            + (f" (permutation p = {p:.3f})" if p is not None else ""),
        )
    ax.legend(fontsize=8, loc="lower right")
    return float(np.nanmin(steps)) if np.isfinite(steps).any() else np.inf


def _dcor_panel(ax: Any, result: dict[str, Any], n: int) -> None:
    """Distance correlation per step, y from ``min(-0.25, lowest - 0.05)`` to 1.05."""
    low = -0.25
    na_dcor = why_not(result, "distance_correlation")
    if na_dcor:
        _say_na(ax, na_dcor)
    elif n:
        low = min(low, _draw_dcor(ax, result, n) - 0.05)
    ax.axhline(0, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(low, 1.05)
    if n:  # same x range as the other panels, also when few steps have a value
        ax.set_xlim(-0.3, max(n - 1, 1) + 0.3)
        ax.set_xlabel("update pair t")
    ax.set_ylabel("bias-corrected dCor\u00b2")
    ax.set_title("Distance correlation of the updates")


def _norms_panel(ax: Any, result: dict[str, Any], n: int) -> None:
    """``||u_t||`` and ``||w_t||``; the title gives their Pearson r (or why it is n/a)."""
    ax.set_ylabel("||update||")
    if not n:
        ax.set_title("Update norms")
        return
    norms = result["update_norms"]
    for m in ("policy", "reward"):
        ax.plot(
            np.arange(n),
            norms[m],
            marker=STYLE[m]["marker"],
            color=STYLE[m]["color"],
            label=STYLE[m]["label"],
        )
    values = np.array(norms["policy"] + norms["reward"])
    if values.min() > 0 and values.max() / values.min() > 30:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, values.max() * 1.08 if values.max() > 0 else 1)
    r, na_r = result["pearson"]["update_norms"], why_not(result, "pearson")
    r_text = "" if r is None else f" (Pearson r = {r:.3f})"
    ax.set_title("Update norms" + (f" (Pearson r {na_r})" if na_r else r_text))
    ax.legend(fontsize=8)


def _coordinate_panel(ax: Any, result: dict[str, Any], n: int) -> None:
    """Histogram (share of coordinates) of the per-coordinate r, with its two summaries."""
    pc = result.get("pearson", {}).get("per_coordinate")
    if n and pc and pc["n_coordinates"]:
        edges, counts = np.array(pc["histogram"]["edges"]), np.array(pc["histogram"]["counts"])
        share = counts / counts.sum()
        ax.bar((edges[:-1] + edges[1:]) / 2, share, width=np.diff(edges) * 0.9, color="#6c757d")
        for key, ls, label in (
            ("weighted_mean", "--", "energy-weighted mean"),
            ("pooled", ":", "pooled"),
        ):
            if pc[key] is not None:
                ax.axvline(pc[key], color="black", ls=ls, lw=1.2, label=f"{label}: {pc[key]:.3f}")
        ax.legend(fontsize=8, loc="upper left")
        ax.set_title(f"Pearson r over time, per coordinate ({pc['n_coordinates']} coords)")
    else:
        ax.set_title("Pearson r over time, per coordinate")
        if n:
            why = why_not(result, "pearson_per_coordinate")
            _say_na(ax, why or "no coordinate moves in both models")
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("r of u_t,d and w_t,d over t")
    ax.set_ylabel("share of coordinates")
    ax.grid(alpha=0.3)


def _suptitle(result: dict[str, Any]) -> str:
    """Sizes of the analysis and the Procrustes disparity against its permutation mean."""
    n = int(result.get("n_pairs", 0))
    proc = result.get("procrustes") or {}
    disp = proc.get("disparity")
    proc_text = (
        (why_not(result, "procrustes") or "n/a (an update set has no spread)")
        if disp is None
        else (
            f"{disp:.3f} (chance {proc['permutation_mean']:.3f}, p = {proc['p_value']:.3f}, "
            f"{proc['k']}-D PCA)"
        )
    )
    return (
        f"Policy-reward interplay: {n} update pairs, pairing by {result.get('pairing')}, "
        f"{result.get('space')} space, k = {result.get('k')}\nProcrustes disparity " + proc_text
    )


def metrics_matplotlib(result: dict[str, Any]) -> Any:
    """The 2 x 2 matplotlib figure of :func:`metrics_png` (angles, dCor, norms, Pearson)."""
    n = int(result.get("n_pairs", 0))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=110)
    _angle_panel(axes[0, 0], result, n)
    _dcor_panel(axes[0, 1], result, n)
    _norms_panel(axes[1, 0], result, n)
    _coordinate_panel(axes[1, 1], result, n)
    offset = result.get("offset", 0)
    for a in (axes[0, 0], axes[0, 1], axes[1, 0]):
        a.set_xlabel(
            f"update pair t (reward t with policy t{offset:+d})" if offset else "update pair t"
        )
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(_suptitle(result), fontsize=12)
    fig.tight_layout()
    return fig


def metrics_png(result: dict[str, Any], path: Path) -> Path:
    """The per-step metrics of :func:`.analysis.analyse` as a 2 x 2 panel PNG."""
    fig = metrics_matplotlib(result)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- plotly
def _metric_traces(result: dict[str, Any]) -> list[tuple[Any, int, int]]:
    """``(trace, row, col)`` of every plotly metric: angles, dCor per step, norms, r_d bins."""
    import plotly.graph_objects as go

    x = list(range(int(result.get("n_pairs", 0))))
    traces = [
        (go.Scatter(x=x, y=result["angle_updates_deg"], name="angle of updates",
                    mode="lines+markers"), 1, 1),
        (go.Scatter(x=x, y=result["angle_velocities_deg"], name="angle of velocities",
                    mode="lines+markers", line={"dash": "dash"}), 1, 1),
    ]  # fmt: skip
    if not why_not(result, "distance_correlation"):
        per_step = result["distance_correlation"]["per_step"]
        traces.append(
            (go.Scatter(x=x, y=per_step, name="distance correlation", mode="lines+markers"), 1, 2)
        )
    for m in ("policy", "reward"):
        traces.append(
            (go.Scatter(x=x, y=result["update_norms"][m], name=f"{STYLE[m]['label']} update norm",
                        mode="lines+markers", line={"color": STYLE[m]["color"]},
                        marker={"symbol": STYLE[m]["plotly_marker"]}), 2, 1)
        )  # fmt: skip
    pc = result["pearson"]["per_coordinate"]
    edges = np.array(pc["histogram"]["edges"])
    traces.append(
        (go.Bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=pc["histogram"]["counts"],
                name="coordinates per r bin", marker_color="#6c757d"), 2, 2)
    )  # fmt: skip
    return traces


def _annotate_unavailable(fig: Any, result: dict[str, Any]) -> None:
    """A statistic below its minimum pairs: say so where its value would be."""
    panels = {  # statistic: (axis suffix of the subplot, prefix)
        "angle_updates": ("", "update angles "),
        "angle_velocities": ("", "velocity angles "),
        "distance_correlation": ("2", ""),
        "pearson_per_coordinate": ("4", ""),
    }
    lines: dict[str, list[str]] = {}
    for statistic, (axis, prefix) in panels.items():
        if (why := why_not(result, statistic)) and prefix + why not in lines.get(axis, []):
            lines.setdefault(axis, []).append(prefix + why)
    for axis, text in lines.items():
        fig.add_annotation(
            text="<br>".join(text), xref=f"x{axis} domain", yref=f"y{axis} domain",
            x=0.5, y=0.5, showarrow=False, font={"size": 14, "color": "#555"},
            bgcolor="white", bordercolor="#bbb",
        )  # fmt: skip


def metrics_figure(result: dict[str, Any]) -> Any:
    """The per-step metrics as a plotly figure (2 x 2 subplots)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(
            "Angle between updates (degrees)",
            "Bias-corrected distance correlation",
            "Update norms",
            "Per-coordinate Pearson r over time",
        ),
    )
    if int(result.get("n_pairs", 0)):
        for trace, row, col in _metric_traces(result):
            fig.add_trace(trace, row=row, col=col)
    _annotate_unavailable(fig, result)
    fig.update_yaxes(range=[0, 180], row=1, col=1)
    fig.update_yaxes(range=[-0.25, 1.05], row=1, col=2)
    for r, c in ((1, 1), (1, 2), (2, 1)):
        fig.update_xaxes(title_text="update pair t", row=r, col=c)
    fig.update_xaxes(title_text="Pearson r over time", range=[-1.05, 1.05], row=2, col=2)
    fig.update_layout(
        height=750,
        template="plotly_white",
        title=f"Policy-reward interplay (offset {result.get('offset', 0)})",
    )
    return fig
