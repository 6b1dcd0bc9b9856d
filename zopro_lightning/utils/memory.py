"""This process's resident memory, read from ``/proc/self/status`` (MiB).

``VmHWM`` (the peak) starts afresh at ``exec``; ``ru_maxrss`` does not: on Linux a child
process inherits its parent's peak, so a benchmark worker or a run started from a large
parent would report the parent's figure. ``ru_maxrss`` is only the fallback where ``/proc``
is missing.
"""

from __future__ import annotations

import resource


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident memory (``VmRSS``), NaN where it cannot be read."""
    current = _status_mb("VmRSS")
    return float("nan") if current is None else current


def peak_rss_mb() -> float:
    """Peak resident memory so far (``VmHWM``; ``ru_maxrss`` without ``/proc``)."""
    peak = _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak
