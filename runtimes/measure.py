"""Memory measurement for runners: process RSS sampled in a thread, and peak RSS per phase
of a generation (load, image, prefill, decode).

A figure that cannot be measured on this platform is None, never 0.
"""

from __future__ import annotations

import os
import re
import sys
import threading

PHASES = ("load", "image", "prefill", "decode")


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


def _kernel_peak_mb() -> float | None:
    """VmHWM: the kernel's own peak RSS of this process (Linux), exact, no sampling."""
    try:
        with open("/proc/self/status") as fh:
            match = re.search(r"^VmHWM:\s+(\d+) kB", fh.read(), re.MULTILINE)
        return int(match.group(1)) * 1024 / 1e6 if match else None
    except OSError:
        return None


def _reset_kernel_peak() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0: "5" > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PhaseMemory:
    """Peak RSS of each phase of a generation, in MB.

    Runners announce phase boundaries with `phase(name)` (a no-op when no trace is active);
    a phase entered several times (llama.cpp interleaves image and prompt chunks) keeps its
    highest peak. On Linux the kernel's peak counter is reset at each boundary, so even a
    millisecond-long spike is counted; elsewhere a sampling thread attributes RSS samples
    to the current phase (a spike shorter than `interval` can be missed).
    """

    def __init__(self, interval: float = 0.01):
        self.peaks: dict[str, float] = {}
        self.current: str | None = None
        self.exact = _reset_kernel_peak() and _kernel_peak_mb() is not None
        self._sampler = None if self.exact else RssSampler(interval)

    def _close_phase(self) -> None:
        if self.current is None:
            return
        if self.exact:
            value = _kernel_peak_mb()
        else:
            self._sampler.__exit__()
            value = self._sampler.peak_mb
        if value is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), value)

    def enter(self, name: str | None) -> None:
        """End the current phase and start `name` (None: stop attributing)."""
        self._close_phase()
        self.current = name
        if name is not None:
            if self.exact:
                _reset_kernel_peak()
            else:
                self._sampler = RssSampler(self._sampler.interval).__enter__()

    def __enter__(self) -> PhaseMemory:
        global _ACTIVE
        self._outer, _ACTIVE = _ACTIVE, self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        self.enter(None)
        _ACTIVE = self._outer

    @property
    def peak_mb(self) -> float | None:
        return max(self.peaks.values()) if self.peaks else None


_ACTIVE: PhaseMemory | None = None


def phase(name: str) -> None:
    """Mark the start of a phase for an active PhaseMemory trace (runners call this)."""
    if _ACTIVE is not None:
        _ACTIVE.enter(name)
