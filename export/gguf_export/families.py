"""Which family module writes which checkpoint (by config.json model_type)."""

from __future__ import annotations

from edgevlm.errors import UnsupportedModelError

# config.json model_type -> writer module; anything else is refused, never half-written.
_MODULES = {
    "smolvlm": "edgevlm.export.gguf_export.smolvlm",
    "idefics3": "edgevlm.export.gguf_export.smolvlm",
    "llava": "edgevlm.export.gguf_export.llava",
    "qwen2_vl": "edgevlm.export.gguf_export.qwen_vl",
    "qwen2_5_vl": "edgevlm.export.gguf_export.qwen_vl",
    "gemma3": "edgevlm.export.gguf_export.gemma3",
}
_FAMILY = {"smolvlm": "smolvlm", "idefics3": "smolvlm", "llava": "llava",
           "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "gemma3": "gemma3"}


def family_module(cfg: dict):
    """(family name, writer module) for a config.json dict."""
    import importlib

    kind = cfg.get("model_type")
    if kind not in _MODULES:
        raise UnsupportedModelError(
            f"GGUF export does not handle model_type '{kind}' yet",
            f"GGUF export supports: {', '.join(sorted(set(_FAMILY.values())))}")
    return _FAMILY[kind], importlib.import_module(_MODULES[kind])
