"""Model-family adapters: one per entry of the family table (edgevlm.runtimes.families),
registered by family name and looked up by config.model_type."""

from __future__ import annotations

from edgevlm.adapters.base import ArchAdapter, get_path
from edgevlm.errors import UnsupportedModelError
from edgevlm.registry import Registry
from edgevlm.runtimes import families

ADAPTERS: Registry[ArchAdapter] = Registry("model family")


def register(adapter: ArchAdapter) -> ArchAdapter:
    ADAPTERS.add(adapter.family, adapter)
    return adapter


def adapter_for_config(config) -> ArchAdapter:
    """The adapter of config.model_type's family, or a clear error."""
    spec = families.for_config(config)
    if spec is not None:
        return ADAPTERS.get(spec.name)
    raise UnsupportedModelError(
        f"unsupported architecture '{getattr(config, 'model_type', None)}' "
        f"({', '.join(getattr(config, 'architectures', None) or ['?'])})",
        f"edgevlm supports: {families.supported()}",
    )


for _spec in families.TABLE:
    register(ArchAdapter.of(_spec))

__all__ = ["ADAPTERS", "ArchAdapter", "adapter_for_config", "get_path", "register"]
