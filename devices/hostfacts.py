"""HostFacts: the few facts about a machine that device detection and thread counts need.

Reading (HostFacts.read) is kept apart from parsing (HostFacts.from_texts) so detection can
be tested on recorded /proc, /etc and sysctl text from real devices.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.errors import UsageError

SYSCTL_KEYS = ("machdep.cpu.brand_string", "hw.memsize", "hw.physicalcpu")
_SYSCTL_TIMEOUT_S = 2.0


@dataclass
class HostFacts:
    """What detect() looks at. Every field but system/machine may be unknown (None/empty).

    ``tegra_release``: text of /etc/nv_tegra_release; ``device_tree_model``: text of
    /proc/device-tree/model; ``sysctl``: macOS values of SYSCTL_KEYS; ``cpu_flags``: x86
    'flags' or ARM 'Features' from /proc/cpuinfo; ``logical_cpus``: CPUs this process may
    run on (affinity mask); ``total_memory_mb``: physical RAM.
    """

    system: str
    machine: str
    tegra_release: str | None = None
    device_tree_model: str | None = None
    sysctl: dict[str, str] = field(default_factory=dict)
    cpu_model: str | None = None
    cpu_flags: list[str] = field(default_factory=list)
    physical_cores: int | None = None
    logical_cpus: int | None = None
    total_memory_mb: int | None = None

    @property
    def is_jetson(self) -> bool:
        """True on NVIDIA Jetson (L4T release file present, or a Jetson device-tree model)."""
        if self.tegra_release:
            return True
        return "jetson" in (self.device_tree_model or "").lower()

    @property
    def cpu_brand(self) -> str:
        """CPU brand string from sysctl (macOS) or /proc/cpuinfo; '' when unknown."""
        return self.sysctl.get("machdep.cpu.brand_string") or self.cpu_model or ""

    @property
    def l4t_version(self) -> str | None:
        """Jetson Linux version from /etc/nv_tegra_release, e.g. '36.4.0'; None elsewhere."""
        m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", self.tegra_release or "")
        return f"{m.group(1)}.{m.group(2)}" if m else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (recorded into bench results and test fixtures)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostFacts:
        """Inverse of to_dict; an unknown key is a UsageError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise UsageError(
                    f"unknown host fact '{key}'", f"valid keys: {', '.join(sorted(known))}"
                )
        return cls(**data)

    @classmethod
    def from_texts(
        cls,
        system: str,
        machine: str,
        *,
        tegra_release: str | None = None,
        device_tree_model: str | bytes | None = None,
        cpuinfo: str | None = None,
        meminfo: str | None = None,
        sysctl: str | dict[str, str] | None = None,
        logical_cpus: int | None = None,
    ) -> HostFacts:
        """Build facts from raw file/command text (what read() gathers, or recorded fixtures).

        ``sysctl`` is either a dict or ``sysctl key...`` output ("key: value" lines).
        """
        if isinstance(device_tree_model, bytes):
            device_tree_model = device_tree_model.decode("utf-8", "replace")
        sysctl_values = parse_sysctl(sysctl) if isinstance(sysctl, str) else dict(sysctl or {})
        blocks = parse_cpuinfo(cpuinfo or "")
        first = blocks[0] if blocks else {}
        flags = first.get("flags") or first.get("Features") or ""

        cores = physical_core_count(cpuinfo or "")
        if cores is None and sysctl_values.get("hw.physicalcpu", "").strip().isdigit():
            cores = int(sysctl_values["hw.physicalcpu"])
        memory_mb = meminfo_total_mb(meminfo or "")
        if memory_mb is None and sysctl_values.get("hw.memsize", "").strip().isdigit():
            memory_mb = int(sysctl_values["hw.memsize"]) // 2**20

        return cls(
            system=system,
            machine=machine,
            tegra_release=(tegra_release or "").strip() or None,
            # The device-tree string is NUL-terminated.
            device_tree_model=(device_tree_model or "").strip("\x00 \n") or None,
            sysctl=sysctl_values,
            cpu_model=first.get("model name") or first.get("Model") or None,
            cpu_flags=flags.split(),
            physical_cores=cores,
            logical_cpus=logical_cpus,
            total_memory_mb=memory_mb,
        )

    @classmethod
    def read(cls) -> HostFacts:
        """Gather the facts of the machine this runs on (never raises for missing sources)."""
        system, machine = platform.system(), platform.machine()
        if hasattr(os, "sched_getaffinity"):
            logical = len(os.sched_getaffinity(0))
        else:  # macOS and Windows have no affinity API in os
            logical = os.cpu_count()
        facts = cls.from_texts(
            system,
            machine,
            tegra_release=_read_text("/etc/nv_tegra_release"),
            device_tree_model=_read_text("/proc/device-tree/model"),
            cpuinfo=_read_text("/proc/cpuinfo"),
            meminfo=_read_text("/proc/meminfo"),
            sysctl=read_sysctl() if system == "Darwin" else None,
            logical_cpus=logical,
        )
        if facts.physical_cores is None:
            facts.physical_cores = os.cpu_count()
        return facts


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per blank-line separated block."""
    blocks, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def physical_core_count(cpuinfo: str) -> int | None:
    """Physical cores in /proc/cpuinfo: unique (physical id, core id) pairs.

    ARM kernels print neither id; their cores have no SMT, so each listed processor
    (only online ones are listed) is a physical core. None when nothing is listed.
    """
    blocks = [b for b in parse_cpuinfo(cpuinfo) if "processor" in b]
    pairs = {
        (b["physical id"], b["core id"]) for b in blocks if "physical id" in b and "core id" in b
    }
    if pairs:
        return len(pairs)
    return len(blocks) or None


def meminfo_total_mb(meminfo: str) -> int | None:
    """MemTotal from /proc/meminfo in MB (MiB, as tegrastats and free -m count)."""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    return round(int(m.group(1)) / 1024) if m else None


def parse_sysctl(text: str) -> dict[str, str]:
    """Parse ``sysctl key...`` output: 'key: value' (macOS) or 'key = value' (BSD) lines."""
    values = {}
    for line in text.splitlines():
        m = re.match(r"^([\w.]+)\s*[:=]\s*(.*)$", line.strip())
        if m:
            values[m.group(1)] = m.group(2).strip()
    return values


def read_sysctl(keys: tuple[str, ...] = SYSCTL_KEYS) -> dict[str, str]:
    """Ask macOS sysctl for each key; keys it lacks or a hung/missing sysctl are left out."""
    values = {}
    for key in keys:
        # One call per key: with several keys an unknown one shifts the -n output lines.
        try:
            done = subprocess.run(
                ["sysctl", "-n", key],
                capture_output=True,
                text=True,
                timeout=_SYSCTL_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip():
            values[key] = done.stdout.strip()
    return values


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
