"""Figures of the interplay analysis: PNG (matplotlib, Agg) and one self-contained HTML.

Conventions in every figure: policy = blue circles, reward model = orange triangles; the
marker shade darkens with time; the start is a large star, the end a large X, both
outlined in black; a dashed line with hollow markers is the linear extrapolation.

Files written under ``out_dir`` (``RUN_DIR/plots``):

* ``trajectory_<method>_<2|3>d.png``: one per projection (named by the method asked
  for; the title says if it fell back to PCA);
* ``metrics.png``: angles, distance correlation per step, update norms and per-coordinate
  Pearson correlations against the update pair; a statistic with fewer pairs than its
  minimum (:data:`.analysis.MIN_PAIRS`) is not drawn, the panel says "n/a: 4 pairs,
  needs >= 5" instead;
* ``interplay.html``: every figure, interactive (plotly, hover shows step / iteration /
  phase), with plotly.js inlined once, so the file opens offline and can be moved alone.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .projections import Projection  # noqa: E402
from .trajectory import Trajectories  # noqa: E402

STYLE = {
    "policy": {
        "color": "#1f5fa8",
        "cmap": "Blues",
        "marker": "o",
        "plotly_marker": "circle",
        "label": "policy",
    },
    "reward": {
        "color": "#e0700b",
        "cmap": "Oranges",
        "marker": "^",
        "plotly_marker": "triangle-up",
        "label": "reward model",
    },
}
_METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def _shades(model: str, n: int) -> np.ndarray:
    """RGBA colours from light to dark in the model's colour map."""
    return plt.get_cmap(STYLE[model]["cmap"])(np.linspace(0.35, 1.0, max(n, 1)))[:n]


def _title(proj: Projection) -> str:
    name = _METHOD_NAMES.get(proj.requested, proj.requested)
    fell_back = proj.method != proj.requested
    how = (
        "policy and reward on shared axes" if proj.mode == "joint" else "each model on its own axes"
    )
    return f"{name} {proj.dims}-D trajectories ({how})" + (
        f"\n{name} not possible here: {proj.method.upper()} shown" if fell_back else ""
    )


def _draw_model(ax: Any, model: str, c: np.ndarray, extra: np.ndarray | None) -> None:
    st = STYLE[model]
    cols = list(c.T)
    ax.plot(*cols, color=st["color"], lw=1.4, alpha=0.7, zorder=1)
    ax.scatter(
        *cols, c=_shades(model, len(c)), marker=st["marker"], s=28, edgecolors="none", zorder=2
    )
    if len(c):
        ax.scatter(
            *c[0],
            marker="*",
            s=320,
            color=st["color"],
            edgecolors="black",
            linewidths=1.0,
            zorder=3,
        )
        ax.scatter(
            *c[-1],
            marker="X",
            s=200,
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
    handles += [
        Line2D(
            [],
            [],
            ls="",
            marker="*",
            ms=14,
            color="0.7",
            mec="black",
            label="start (same point for both)" if joint else "start",
        ),
        Line2D([], [], ls="", marker="X", ms=11, color="0.7", mec="black", label="end"),
    ]
    if extrapolated:
        handles.append(Line2D([], [], ls="--", color="0.4", label="linear extrapolation"))
    return handles


def trajectory_png(proj: Projection, trajectories: Trajectories, path: Path) -> Path:
    """One projection as a PNG (one panel when joint, one per model when separate)."""
    models = [m for m in ("policy", "reward") if m in proj.coords]
    panels = [models] if proj.mode == "joint" else [[m] for m in models]
    kw = {"projection": "3d"} if proj.dims == 3 else {}
    width = 7.5 if len(panels) == 1 else 13.0
    fig = plt.figure(figsize=(width, 6.2), dpi=120)
    for p, group in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1, **kw)
        for m in group:
            _draw_model(ax, m, proj.coords[m], proj.extrapolated.get(m))
        labels = proj.axis_labels[group[0]]
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        if proj.dims == 3:
            ax.set_zlabel(labels[2])
        else:
            ax.grid(alpha=0.3)
        if len(panels) > 1:
            ax.set_title(STYLE[group[0]]["label"], fontsize=11)
        handles = _legend_handles(
            group,
            trajectories,
            bool(proj.extrapolated),
            proj.mode == "joint" and proj.method == "pca",  # linear: both starts coincide
        )
        ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    fig.suptitle(_title(proj), fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _xs(n: int) -> np.ndarray:
    return np.arange(n)


def _why_not(result: dict[str, Any], statistic: str) -> str | None:
    """The analysis's "n/a: n pairs, needs >= m" for a statistic it did not report."""
    return (result.get("unavailable") or {}).get(statistic)


def _say_na(ax: Any, text: str) -> None:
    """Write why a panel has no value in its middle, instead of drawing one."""
    ax.text(
        0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
        color="0.35", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"},
    )  # fmt: skip


def metrics_png(result: dict[str, Any], path: Path) -> Path:
    """The per-step metrics of :func:`.analysis.analyse` as a 2 x 2 panel PNG."""
    fig = metrics_matplotlib(result)
    fig.savefig(path)
    plt.close(fig)
    return path


def metrics_matplotlib(result: dict[str, Any]) -> Any:
    """The 2 x 2 matplotlib figure of :func:`metrics_png` (angles, dCor, norms, Pearson)."""
    n = int(result.get("n_pairs", 0))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=110)
    x = _xs(n)
    nan = np.nan

    def series(values: Sequence[float | None]) -> np.ndarray:
        return np.array([nan if v is None else v for v in values], dtype=float)

    ax = axes[0, 0]
    na_updates = _why_not(result, "angle_updates")
    na_velocities = _why_not(result, "angle_velocities")
    if n and not na_updates:
        ax.plot(
            x, series(result["angle_updates_deg"]), "o-", color="#444", label="updates (u_t, w_t)"
        )
    if n and not na_velocities:
        ax.plot(
            x,
            series(result["angle_velocities_deg"]),
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

    ax = axes[0, 1]
    low = -0.25
    na_dcor = _why_not(result, "distance_correlation")
    if na_dcor:
        _say_na(ax, na_dcor)
    elif n:
        dc = result["distance_correlation"]
        steps = series(dc["per_step"])
        how = "cumulative" if dc["window"] is None else f"window of {dc['window']} pairs"
        need = (result.get("min_pairs") or {}).get("distance_correlation")
        how += f", from {need} pairs" if need and dc["window"] is None else ""
        ax.plot(x, steps, "o-", color="#2a9d8f", label=f"per step ({how})")
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
        if np.isfinite(steps).any():
            low = min(low, float(np.nanmin(steps)) - 0.05)
    ax.axhline(0, color="0.6", lw=0.8, ls=":")
    ax.set_ylim(low, 1.05)
    if n:  # same x range as the other panels, also when few steps have a value
        ax.set_xlim(-0.3, max(n - 1, 1) + 0.3)
        ax.set_xlabel("update pair t")
    ax.set_ylabel("bias-corrected dCor\u00b2")
    ax.set_title("Distance correlation of the updates")

    ax = axes[1, 0]
    if n:
        norms = result["update_norms"]
        for m in ("policy", "reward"):
            ax.plot(
                x,
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
        r, na_r = result["pearson"]["update_norms"], _why_not(result, "pearson")
        r_text = "" if r is None else f" (Pearson r = {r:.3f})"
        ax.set_title("Update norms" + (f" (Pearson r {na_r})" if na_r else r_text))
        ax.legend(fontsize=8)
    else:
        ax.set_title("Update norms")
    ax.set_ylabel("||update||")

    ax = axes[1, 1]
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
            why = _why_not(result, "pearson_per_coordinate")
            _say_na(ax, why or "no coordinate moves in both models")
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("r of u_t,d and w_t,d over t")
    ax.set_ylabel("share of coordinates")
    ax.grid(alpha=0.3)

    offset = result.get("offset", 0)
    for a in (axes[0, 0], axes[0, 1], axes[1, 0]):
        a.set_xlabel(
            f"update pair t (reward t with policy t{offset:+d})" if offset else "update pair t"
        )
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    proc = result.get("procrustes") or {}
    disp = proc.get("disparity")
    proc_text = (
        (_why_not(result, "procrustes") or "n/a (an update set has no spread)")
        if disp is None
        else (
            f"{disp:.3f} (chance {proc['permutation_mean']:.3f}, p = {proc['p_value']:.3f}, "
            f"{proc['k']}-D PCA)"
        )
    )
    fig.suptitle(
        f"Policy-reward interplay: {n} update pairs, pairing by {result.get('pairing')}, "
        f"{result.get('space')} space, k = {result.get('k')}\nProcrustes disparity " + proc_text,
        fontsize=12,
    )
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- plotly
def _hover(trajectories: Trajectories, model: str) -> list[str]:
    t = trajectories[model]
    return [
        f"{model} #{i}<br>step {t.steps[i]}, iteration {t.iterations[i]}<br>"
        f"phase {t.phases[i]}, fraction {t.fractions[i]:.3f}"
        for i in range(t.n)
    ]


def trajectory_figure(proj: Projection, trajectories: Trajectories) -> Any:
    """The projection as a plotly figure (subplots per model when separate)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    models = [m for m in ("policy", "reward") if m in proj.coords]
    groups = [models] if proj.mode == "joint" else [[m] for m in models]
    spec = {"type": "scene"} if proj.dims == 3 else {"type": "xy"}
    fig = make_subplots(
        rows=1,
        cols=len(groups),
        specs=[[spec] * len(groups)],
        subplot_titles=None if len(groups) == 1 else [STYLE[g[0]]["label"] for g in groups],
    )
    for col, group in enumerate(groups, start=1):
        for m in group:
            st, c = STYLE[m], proj.coords[m]
            scatter = go.Scatter3d if proj.dims == 3 else go.Scatter

            def xyz(a: np.ndarray) -> dict[str, Any]:
                keys = ("x", "y", "z")[: proj.dims]
                return {k: a[:, j] for j, k in enumerate(keys)}

            shades = [
                f"rgba({r * 255:.0f},{g * 255:.0f},{b * 255:.0f},{a:.2f})"
                for r, g, b, a in _shades(m, len(c))
            ]
            fig.add_trace(
                scatter(
                    **xyz(c),
                    mode="lines+markers",
                    name=st["label"],
                    legendgroup=m,
                    text=_hover(trajectories, m),
                    hoverinfo="text",
                    line={"color": st["color"], "width": 3},
                    marker={
                        "color": shades,
                        "symbol": st["plotly_marker"]
                        if proj.dims == 2
                        else ("circle" if m == "policy" else "diamond"),
                        "size": 8 if proj.dims == 2 else 4,
                    },
                ),
                row=1,
                col=col,
            )
            for idx, sym, label in ((0, "star", "start"), (-1, "x", "end")):
                if not len(c):
                    continue
                sym3 = "diamond-open" if label == "start" else "x"
                fig.add_trace(
                    scatter(
                        **xyz(c[[idx]]),
                        mode="markers",
                        name=f"{st['label']} {label}",
                        legendgroup=m,
                        text=[_hover(trajectories, m)[idx]],
                        hoverinfo="text",
                        marker={
                            "color": st["color"],
                            "symbol": sym if proj.dims == 2 else sym3,
                            "size": 18 if proj.dims == 2 else 9,
                            "line": {"color": "black", "width": 1.5},
                        },
                    ),
                    row=1,
                    col=col,
                )
            extra = proj.extrapolated.get(m)
            if extra is not None and len(extra) and len(c):
                fig.add_trace(
                    scatter(
                        **xyz(np.concatenate([c[-1:], extra])),
                        mode="lines+markers",
                        name=f"{st['label']} extrapolation",
                        legendgroup=m,
                        line={"color": st["color"], "dash": "dash"},
                        marker={"color": st["color"], "size": 4},
                    ),
                    row=1,
                    col=col,
                )
        labels = proj.axis_labels[group[0]]
        if proj.dims == 3:
            scene = "scene" if col == 1 else f"scene{col}"
            fig.layout[scene].update(
                xaxis_title=labels[0], yaxis_title=labels[1], zaxis_title=labels[2]
            )
        else:
            fig.update_xaxes(title_text=labels[0], row=1, col=col)
            fig.update_yaxes(title_text=labels[1], row=1, col=col)
    fig.update_layout(title=_title(proj).replace("\n", "<br>"), height=600, template="plotly_white")
    return fig


def metrics_figure(result: dict[str, Any]) -> Any:
    """The per-step metrics as a plotly figure (2 x 2 subplots)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = int(result.get("n_pairs", 0))
    x = list(range(n))
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
    if n:
        fig.add_trace(
            go.Scatter(
                x=x, y=result["angle_updates_deg"], name="angle of updates", mode="lines+markers"
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=result["angle_velocities_deg"],
                name="angle of velocities",
                mode="lines+markers",
                line={"dash": "dash"},
            ),
            row=1,
            col=1,
        )
        if not _why_not(result, "distance_correlation"):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=result["distance_correlation"]["per_step"],
                    name="distance correlation",
                    mode="lines+markers",
                ),
                row=1,
                col=2,
            )
        for m in ("policy", "reward"):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=result["update_norms"][m],
                    name=f"{STYLE[m]['label']} update norm",
                    mode="lines+markers",
                    line={"color": STYLE[m]["color"]},
                    marker={"symbol": STYLE[m]["plotly_marker"]},
                ),
                row=2,
                col=1,
            )
        pc = result["pearson"]["per_coordinate"]
        edges = np.array(pc["histogram"]["edges"])
        fig.add_trace(
            go.Bar(
                x=((edges[:-1] + edges[1:]) / 2).tolist(),
                y=pc["histogram"]["counts"],
                name="coordinates per r bin",
                marker_color="#6c757d",
            ),
            row=2,
            col=2,
        )
    # a statistic below its minimum pairs: say so where its value would be
    panels = {  # statistic: (axis suffix of the subplot, prefix)
        "angle_updates": ("", "update angles "),
        "angle_velocities": ("", "velocity angles "),
        "distance_correlation": ("2", ""),
        "pearson_per_coordinate": ("4", ""),
    }
    lines: dict[str, list[str]] = {}
    for statistic, (axis, prefix) in panels.items():
        if (why := _why_not(result, statistic)) and prefix + why not in lines.get(axis, []):
            lines.setdefault(axis, []).append(prefix + why)
    for axis, text in lines.items():
        fig.add_annotation(
            text="<br>".join(text), xref=f"x{axis} domain", yref=f"y{axis} domain",
            x=0.5, y=0.5, showarrow=False, font={"size": 14, "color": "#555"},
            bgcolor="white", bordercolor="#bbb",
        )  # fmt: skip
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


def _summary_rows(result: dict[str, Any]) -> str:
    keys = ("n_pairs", "offset", "pairing", "space", "k", "energy_kept")
    rows = [(k, result.get(k)) for k in keys if k in result]
    if "procrustes_disparity" in result:
        rows.append(("procrustes_disparity", result["procrustes_disparity"], "procrustes"))
    if "distance_correlation" in result:
        rows.append(
            (
                "distance correlation (all)",
                result["distance_correlation"]["overall"],
                "distance_correlation",
            )
        )
    if "pearson" in result:
        rows.append(("Pearson r of update norms", result["pearson"]["update_norms"], "pearson"))

    def cell(row: tuple) -> str:
        why = _why_not(result, row[2]) if len(row) > 2 else None
        return why if why and row[1] is None else json.dumps(row[1])

    return "".join(
        f"<tr><td>{html.escape(str(row[0]))}</td><td>{html.escape(cell(row))}</td></tr>"
        for row in rows
    )


def report_html(
    figures: Sequence[tuple[str, Any]], result: dict[str, Any] | None, path: Path
) -> Path:
    """One self-contained HTML page: a summary table and every figure (plotly.js inlined once)."""
    parts = []
    for i, (heading, fig) in enumerate(figures):
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0))
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{div}")
    table = f"<table>{_summary_rows(result)}</table>" if result else ""
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<title>ZOPrO policy-reward interplay</title><style>body{font-family:sans-serif;"
        "margin:2em} td{padding:2px 12px;border-bottom:1px solid #ddd}</style></head>"
        f"<body><h1>Policy-reward interplay</h1>{table}\n" + "\n".join(parts) + "</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path


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
    if result is not None and result.get("n_pairs"):
        written.append(metrics_png(result, out_dir / "metrics.png"))
    if html_report:
        figures = [
            (_title(p).replace("\n", " - "), trajectory_figure(p, trajectories))
            for p in projections
        ]
        if result is not None and result.get("n_pairs"):
            figures.append(("Per-step metrics", metrics_figure(result)))
        written.append(report_html(figures, result, out_dir / "interplay.html"))
    return written
