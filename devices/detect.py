"""Pick the device profile that fits a host. Pure over HostFacts, so fixtures can drive it."""

from __future__ import annotations

from collections.abc import Iterable

from edgevlm.errors import UsageError

from .catalog import builtin_profiles
from .hostfacts import HostFacts
from .profile import DeviceProfile, MatchRules


def matches(rules: MatchRules, facts: HostFacts) -> bool:
    """Whether ``facts`` satisfy every rule in ``rules`` (see MatchRules)."""

    def one_of(wanted: tuple[str, ...], actual: str) -> bool:
        return not wanted or actual.lower() in {w.lower() for w in wanted}

    def contains(wanted: tuple[str, ...], actual: str | None) -> bool:
        return not wanted or any(w.lower() in (actual or "").lower() for w in wanted)

    return (
        one_of(rules.system, facts.system)
        and one_of(rules.machine, facts.machine)
        and (rules.jetson is None or rules.jetson == facts.is_jetson)
        and contains(rules.model_contains, facts.device_tree_model)
        and contains(rules.tegra_release_contains, facts.tegra_release)
        and contains(rules.cpu_brand_contains, facts.cpu_brand)
    )


def detect(
    facts: HostFacts | None = None, profiles: Iterable[DeviceProfile] | None = None
) -> DeviceProfile:
    """The highest-priority profile whose match rules fit ``facts`` (default: this machine).

    ``profiles`` defaults to the built-in ones. No match is a UsageError that shows the
    facts looked at, so an unknown board fails loudly instead of getting a wrong profile.
    """
    facts = facts if facts is not None else HostFacts.read()
    candidates = list(builtin_profiles().values() if profiles is None else profiles)
    for profile in sorted(candidates, key=lambda p: (-p.priority, p.name)):
        if matches(profile.match, facts):
            return profile
    seen = f"system={facts.system!r}, machine={facts.machine!r}"
    if facts.is_jetson:
        seen += f", Jetson board model={facts.device_tree_model!r}, L4T={facts.l4t_version!r}"
    names = ", ".join(p.name for p in candidates) or "(none)"
    raise UsageError(
        f"no device profile matches this host ({seen})",
        f"choose one explicitly (--device NAME; available: {names}) "
        "or pass the path of your own profile .toml",
    )
