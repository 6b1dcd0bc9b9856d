"""The interactive report: one self-contained HTML page with a summary table and every figure.

plotly.js is inlined once, with the first figure, so the file opens offline and can be moved
alone. The table lists the sizes of the analysis and its overall statistics; a statistic
that is not reported shows why (:mod:`.undefined`) instead of ``null``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .undefined import why_not

_STYLE = "body{font-family:sans-serif;margin:2em} td{padding:2px 12px;border-bottom:1px solid #ddd}"


def _summary_rows(result: dict[str, Any]) -> str:
    """``<tr>`` rows of the summary table: (label, JSON value, or the n/a reason)."""
    keys = ("n_pairs", "offset", "pairing", "space", "k", "energy_kept")
    rows: list[tuple[str, Any, str | None]] = [
        (k, result.get(k), None) for k in keys if k in result
    ]
    if "procrustes_disparity" in result:
        rows.append(("procrustes_disparity", result["procrustes_disparity"], "procrustes"))
    if "distance_correlation" in result:
        overall = result["distance_correlation"]["overall"]
        rows.append(("distance correlation (all)", overall, "distance_correlation"))
    if "pearson" in result:
        rows.append(("Pearson r of update norms", result["pearson"]["update_norms"], "pearson"))

    def cell(value: Any, statistic: str | None) -> str:
        why = why_not(result, statistic) if statistic else None
        return why if why and value is None else json.dumps(value)

    return "".join(
        f"<tr><td>{html.escape(str(label))}</td><td>{html.escape(cell(value, statistic))}</td></tr>"
        for label, value, statistic in rows
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
        f"<title>ZOPrO policy-reward interplay</title><style>{_STYLE}</style></head>"
        f"<body><h1>Policy-reward interplay</h1>{table}\n" + "\n".join(parts) + "</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
