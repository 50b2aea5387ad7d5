"""Which family module writes which checkpoint: the family table's `gguf_writer`."""

from __future__ import annotations

from edgevlm.errors import UnsupportedModelError
from edgevlm.runtimes import families


def family_module(cfg: dict):
    """(family name, writer module) for a config.json dict; anything else is refused, never
    half-written."""
    import importlib

    spec = families.for_config(cfg)
    if spec is None or "gguf" not in spec.targets:
        raise UnsupportedModelError(
            f"GGUF export does not handle model_type '{cfg.get('model_type')}' yet",
            "GGUF export supports: " + ", ".join(
                sorted(f.name for f in families.TABLE if "gguf" in f.targets)))
    return spec.name, importlib.import_module(f"edgevlm.export.gguf_export.{spec.gguf_writer}")
