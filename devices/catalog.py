"""The built-in device profiles shipped in devices/profiles/, and lookup by name."""

from __future__ import annotations

import functools
from importlib import resources

from edgevlm.errors import UsageError
from edgevlm.registry import Registry

from .profile import DeviceProfile, load_profile, profile_from_toml


@functools.lru_cache(maxsize=1)
def _registry() -> Registry[DeviceProfile]:
    folder = resources.files(__package__).joinpath("profiles")
    loaded = [
        profile_from_toml(
            entry.read_text(encoding="utf-8"),
            f"edgevlm/devices/profiles/{entry.name}",
            expected_name=entry.name.removesuffix(".toml"),
        )
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    ]
    registry: Registry[DeviceProfile] = Registry("device profile")
    # Registry keeps insertion order, so builtin_profiles() lists profiles in detection order.
    for profile in sorted(loaded, key=lambda p: (-p.priority, p.name)):
        registry.add(profile.name, profile)
    return registry


def builtin_profiles() -> dict[str, DeviceProfile]:
    """All shipped profiles by name, in detection order (highest priority first)."""
    return dict(_registry().items())


def get_profile(name: str) -> DeviceProfile:
    """A built-in profile by name ('jetson_orin_nano' works too), or a path to a .toml file.

    An unknown name is a UsageError listing the known names with a did-you-mean hint.
    """
    if name.endswith(".toml"):
        return load_profile(name)
    try:
        return _registry().get(name)
    except UsageError as exc:
        raise UsageError(exc.what, f"{exc.fix}; or pass the path of a profile .toml file") from None
