"""Styles shared by every interplay figure, matplotlib or plotly.

Policy = blue circles, reward model = orange triangles; the marker shade darkens with time
(a colour map sampled from 0.35 to 1.0 over the snapshots); the start is a large star, the
end a large X, both outlined in black; a dashed line with hollow markers is the linear
extrapolation.
"""

from __future__ import annotations

import matplotlib
import numpy as np

from .projections import Projection

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
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def shades(model: str, n: int) -> np.ndarray:
    """``[n, 4]`` RGBA colours from light to dark in the model's colour map: the map at
    ``linspace(0.35, 1.0, n)``."""
    cmap = matplotlib.colormaps[STYLE[model]["cmap"]]
    return cmap(np.linspace(0.35, 1.0, max(n, 1)))[:n]


def projection_title(proj: Projection) -> str:
    """Title of a trajectory figure: method, dimension, joint or separate axes, and the
    method actually drawn when the one asked for fell back to PCA (second line)."""
    name = METHOD_NAMES.get(proj.requested, proj.requested)
    fell_back = proj.method != proj.requested
    how = (
        "policy and reward on shared axes" if proj.mode == "joint" else "each model on its own axes"
    )
    return f"{name} {proj.dims}-D trajectories ({how})" + (
        f"\n{name} not possible here: {proj.method.upper()} shown" if fell_back else ""
    )
