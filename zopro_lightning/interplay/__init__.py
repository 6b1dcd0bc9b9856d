"""Policy-reward interplay analysis (docs/algorithm.md §3).

Snapshots: ``snapshots`` writes and reads the snapshot format (``sketch`` projects large
ones), ``trajectory`` holds them in memory. Metrics: ``analysis`` computes them on the
updates (``pairing`` pairs the updates, ``reduction`` reduces them, ``statistics`` and
``significance`` measure them, ``undefined`` is the n/a rule). Figures: ``projections``
embeds the trajectories in 2-D / 3-D; ``trajectory_plots``, ``metrics_plots`` and
``html_report`` draw them, ``plots`` writes them all. ``cli`` is the ``zopro-viz`` command.
Matplotlib, plotly, t-SNE and UMAP are imported only by the modules that draw or embed.
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
