"""Jetson memory and power readings from NVIDIA's `tegrastats` tool.

On Jetson the GPU shares RAM with the CPU and CUDA allocations do not show in a process's
RSS, so system RAM used (as tegrastats reports it) is the honest peak-memory figure; its
INA3221 power rails are the only power reading available without root.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

from edgevlm.errors import EdgeVLMError

_TIME = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CORE = re.compile(r"(\d+(?:\.\d+)?)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+(?:\.\d+)?)%")
_EMC = re.compile(r"\bEMC_FREQ (\d+(?:\.\d+)?)%")
_TEMP = re.compile(r"\b([A-Za-z]\w*)@(-?\d+(?:\.\d+)?)C\b")
# 'VDD_IN 4523mW/4523mW' (JetPack 5+) or 'POM_5V_IN 2117/2117' (JetPack 4, no unit).
# The lookahead keeps 'RAM 3021/7620MB' and 'SWAP 0/3810MB' out.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
# tegrastats prints -256C for a thermal zone that is switched off (e.g. AGX Orin's CV0, GPU idle).
_SENSOR_OFF_C = -256.0

# Rails that measure the whole module's input (Orin Nano/NX, Xavier NX, TX2, Nano: VDD_IN;
# JetPack 4 Nano: POM_5V_IN). AGX Orin has none; the sum of its GPU+SoC, CPU+CV and 5 V
# system rails is the usual module-power estimate there.
_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
_AGX_ORIN_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")


@dataclass
class TegrastatsSample:
    """One tegrastats line. ``cpu_percent`` has None for an offline core; ``power_mw`` is
    the instantaneous reading per rail and ``power_avg_mw`` tegrastats's running average."""

    ram_used_mb: int
    ram_total_mb: int
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_percent: list[float | None] = field(default_factory=list)
    cpu_freq_mhz: list[int | None] = field(default_factory=list)
    gpu_percent: float | None = None
    emc_percent: float | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)
    power_avg_mw: dict[str, int] = field(default_factory=dict)
    timestamp: str | None = None

    @property
    def total_power_mw(self) -> int | None:
        """Module input power: the input rail if there is one, else the AGX Orin rail sum,
        else the sum of all rails (unknown boards); None when the line has no rails."""
        for rail in _INPUT_RAILS:
            if rail in self.power_mw:
                return self.power_mw[rail]
        if all(rail in self.power_mw for rail in _AGX_ORIN_RAILS):
            return sum(self.power_mw[rail] for rail in _AGX_ORIN_RAILS)
        return sum(self.power_mw.values()) if self.power_mw else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def parse_tegrastats(line: str) -> TegrastatsSample:
    """Parse one tegrastats output line (JetPack 4 to 6 formats).

    Raises EdgeVLMError for a line without the RAM field (not tegrastats output).
    """
    ram = _RAM.search(line)
    if ram is None:
        raise EdgeVLMError(
            f"not a tegrastats line (no 'RAM used/totalMB' field): {line.strip()[:120]!r}",
            "pass lines printed by `tegrastats`",
        )
    sample = TegrastatsSample(ram_used_mb=int(ram.group(1)), ram_total_mb=int(ram.group(2)))
    if m := _TIME.match(line):
        sample.timestamp = m.group(1)
    if m := _SWAP.search(line):
        sample.swap_used_mb, sample.swap_total_mb = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(line):
        for entry in m.group(1).split(","):
            core = _CORE.match(entry.strip())
            sample.cpu_percent.append(float(core.group(1)) if core else None)
            sample.cpu_freq_mhz.append(int(core.group(2)) if core and core.group(2) else None)
    if m := _GR3D.search(line):
        sample.gpu_percent = float(m.group(1))
    if m := _EMC.search(line):
        sample.emc_percent = float(m.group(1))
    for name, value in _TEMP.findall(line):
        if float(value) != _SENSOR_OFF_C:
            sample.temperatures_c[name] = float(value)
    for name, now, avg in _RAIL.findall(line):
        sample.power_mw[name] = int(now)
        sample.power_avg_mw[name] = int(avg)
    return sample


@dataclass(frozen=True)
class TegrastatsSummary:
    """What a TegrastatsSampler saw. Every figure is None when it could not be measured
    (no tegrastats, no samples, no power rails) — never 0, which would read as a real value.
    ``baseline_ram_mb`` is the first sample, so callers can subtract what was already used."""

    available: bool
    samples: int
    baseline_ram_mb: int | None
    peak_ram_mb: int | None
    mean_power_w: float | None
    peak_power_w: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


class TegrastatsSampler:
    """Run ``tegrastats --interval N`` while a block of code runs and summarise it.

    >>> with TegrastatsSampler(interval_ms=100) as sampler:
    ...     run_benchmark()
    >>> sampler.summary.peak_ram_mb, sampler.summary.mean_power_w

    Without tegrastats (not a Jetson, or ``executable`` missing) nothing is started and
    the summary has available=False and None figures.
    """

    def __init__(self, interval_ms: int = 100, executable: str | None = None):
        self.interval_ms = max(1, int(interval_ms))
        self.executable = executable if executable is not None else shutil.which("tegrastats")
        self.summary: TegrastatsSummary | None = None
        self.bad_lines = 0
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._first = threading.Event()
        self._lock = threading.Lock()
        self._samples = 0
        self._baseline: int | None = None
        self._peak_ram: int | None = None
        self._power_sum_mw = 0
        self._power_n = 0
        self._power_peak_mw: int | None = None

    @property
    def available(self) -> bool:
        """Whether tegrastats is running (or ran) for this sampler."""
        return self._proc is not None

    def start(self) -> TegrastatsSampler:
        """Start tegrastats in the background; a no-op when it is not installed."""
        if self.executable is None or self._proc is not None:
            return self
        try:
            self._proc = subprocess.Popen(
                [self.executable, "--interval", str(self.interval_ms)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError:  # missing, not executable: same as "not a Jetson"
            return self
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> TegrastatsSummary:
        """Stop tegrastats and return (and keep in ``.summary``) what it measured."""
        proc = self._proc
        if proc is not None:
            # A block shorter than one interval would otherwise yield no sample at all.
            if proc.poll() is None:
                self._first.wait(timeout=2 * self.interval_ms / 1000 + 1.0)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self._thread is not None:
                self._thread.join(timeout=2)
        with self._lock:
            n = self._power_n
            self.summary = TegrastatsSummary(
                available=proc is not None,
                samples=self._samples,
                baseline_ram_mb=self._baseline,
                peak_ram_mb=self._peak_ram,
                mean_power_w=self._power_sum_mw / n / 1000 if n else None,
                peak_power_w=self._power_peak_mw / 1000 if n else None,
            )
        return self.summary

    def __enter__(self) -> TegrastatsSampler:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _read(self) -> None:
        stdout = self._proc.stdout if self._proc is not None else None
        for line in stdout or ():
            try:
                sample = parse_tegrastats(line)
            except EdgeVLMError:  # warnings tegrastats prints between samples
                self.bad_lines += 1
                continue
            with self._lock:
                self._samples += 1
                if self._baseline is None:
                    self._baseline = sample.ram_used_mb
                self._peak_ram = max(self._peak_ram or 0, sample.ram_used_mb)
                if (total := sample.total_power_mw) is not None:
                    self._power_sum_mw += total
                    self._power_n += 1
                    self._power_peak_mw = max(self._power_peak_mw or 0, total)
            self._first.set()
