"""Model-family adapters, registered by family name and looked up by config.model_type."""

from __future__ import annotations

from edgevlm.adapters.base import ArchAdapter, get_path
from edgevlm.errors import UnsupportedModelError
from edgevlm.registry import Registry

ADAPTERS: Registry[ArchAdapter] = Registry("model family")


def register(adapter: ArchAdapter) -> ArchAdapter:
    ADAPTERS.add(adapter.family, adapter)
    return adapter


def adapter_for_config(config) -> ArchAdapter:
    """The adapter whose model_types include config.model_type, or a clear error."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedModelError(
        f"unsupported architecture '{model_type}' "
        f"({', '.join(getattr(config, 'architectures', None) or ['?'])})",
        f"edgevlm supports: {supported}",
    )


# Importing the family modules registers them.
from edgevlm.adapters import gemma3, llava, qwen2_vl, smolvlm  # noqa: E402,F401

__all__ = ["ADAPTERS", "ArchAdapter", "adapter_for_config", "get_path", "register"]
