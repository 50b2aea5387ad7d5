"""Memory and time measurement for runners: process RSS sampled in a thread.

A figure that cannot be measured on this platform is None, never 0.
"""

from __future__ import annotations

import os
import sys
import threading


def current_rss_mb() -> float | None:
    """Resident set size of this process now (Linux /proc; elsewhere None)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def peak_rss_mb() -> float | None:
    """Peak RSS of this process so far. ru_maxrss is KiB on Linux but bytes on macOS."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


class RssSampler:
    """Samples RSS every `interval` s while active; `.peak_mb` is the highest seen.

    ru_maxrss alone would report the lifetime peak of the process (including, say, an
    earlier model); sampling gives the peak during this block.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        value = current_rss_mb()
        if value is not None:
            self.peak_mb = value if self.peak_mb is None else max(self.peak_mb, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        if current_rss_mb() is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()
        if self.peak_mb is None:  # no /proc: fall back to the lifetime peak
            self.peak_mb = peak_rss_mb()
