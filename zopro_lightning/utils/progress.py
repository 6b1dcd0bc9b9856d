"""Progress bars for the work a run does outside a Lightning loop (evaluation, refinement's
fresh completions and judging), drawn like Lightning's own ``TQDMProgressBar``: tqdm on stdout.

A caller passes a description to get a bar, or ``None`` for none (library use, other ranks,
``trainer.enable_progress_bar=false``).
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, description: str | None) -> tqdm:
    """A bar over ``total`` items, or a silent stand-in (same methods) when ``description`` is
    ``None``. Use it as a context manager and call ``update(n)`` after each chunk."""
    return tqdm(
        total=total,
        desc=description,
        disable=description is None,
        file=sys.stdout,
        leave=False,
        dynamic_ncols=True,
        smoothing=0,
    )
