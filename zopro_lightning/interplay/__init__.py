"""Policy-reward interplay analysis (DESIGN.md section 3).

``snapshots`` writes and reads the snapshot format; ``analysis`` computes the metrics on
the updates; ``projections`` embeds the trajectories in 2-D / 3-D; ``plots`` draws them;
``cli`` is the ``zopro-viz`` command. Matplotlib, plotly, t-SNE and UMAP are imported only
by the modules that draw or embed.
"""

from .analysis import analyse
from .snapshots import SnapshotWriter, load_peft_adapters, load_run
from .trajectory import Trajectories, Trajectory

__all__ = [
    "SnapshotWriter",
    "Trajectories",
    "Trajectory",
    "analyse",
    "load_peft_adapters",
    "load_run",
]
