"""Device profiles (data files) and host detection for Jetson, Apple Silicon and CPU machines.

Stdlib only: this package must import on a device that has no torch or transformers.
"""

from .catalog import builtin_profiles, get_profile
from .detect import detect, matches
from .hostfacts import HostFacts, physical_core_count
from .profile import (
    GRAPHS,
    DeviceProfile,
    InstallHints,
    MatchRules,
    Providers,
    load_profile,
)
from .tegrastats import (
    TegrastatsSample,
    TegrastatsSampler,
    TegrastatsSummary,
    parse_tegrastats,
)

__all__ = [
    "GRAPHS",
    "DeviceProfile",
    "HostFacts",
    "InstallHints",
    "MatchRules",
    "Providers",
    "TegrastatsSample",
    "TegrastatsSampler",
    "TegrastatsSummary",
    "builtin_profiles",
    "detect",
    "get_profile",
    "load_profile",
    "matches",
    "parse_tegrastats",
    "physical_core_count",
]
