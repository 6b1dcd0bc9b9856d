"""This process's resident memory, read from ``/proc/self/status`` (MiB).

``VmHWM`` (the peak) starts afresh at ``exec``; ``ru_maxrss`` does not: on Linux a child
process inherits its parent's peak, so a benchmark worker or a run started from a large
parent would report the parent's figure. ``ru_maxrss`` is only the fallback where ``/proc``
is missing.
"""

from __future__ import annotations

import resource
import threading


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


def held_mb() -> float:
    """Memory the process holds now: anonymous plus shared resident pages (``RssAnon +
    RssShmem``), MiB. Pages of memory-mapped files on disk (``RssFile``) are page cache the OS
    can drop and read again, so they do not count. NaN where ``/proc`` is missing."""
    anon, shmem = _status_mb("RssAnon"), _status_mb("RssShmem")
    return float("nan") if anon is None else anon + (shmem or 0.0)


class PeakHeld:
    """The peak of :func:`held_mb` while inside, sampled by a thread every ``interval`` seconds
    (and once on entry and exit): ``with PeakHeld() as peak: ...; peak.mb``."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.mb = interval, float("nan")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.mb = max(self.mb, held_mb())

    def __enter__(self) -> PeakHeld:
        self.mb = held_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.mb = max(self.mb, held_mb())
