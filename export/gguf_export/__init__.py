"""GGUF export (text model + mmproj) for llama.cpp, verified in llama.cpp itself.

Entry points: `export_gguf` (write + verify, returns the manifest), `check_gguf_quant`
(argument check before any work) and `GGUF_QUANTS` (what exists and how it is made).
"""

from __future__ import annotations

from edgevlm.export.gguf_export.api import check_gguf_quant as _check_gguf_quant
from edgevlm.export.gguf_export.api import export_gguf as _export_gguf
from edgevlm.export.gguf_export.quantize import GGUF_QUANTS, MMPROJ_TYPES


def check_gguf_quant(quant: str, model_config=None, **options) -> None:
    """`api.check_gguf_quant`, refusing checkpoints with ShortV frozen layers first."""
    from edgevlm.freeze import refuse_gguf

    refuse_gguf(model_config)
    _check_gguf_quant(quant, model_config, **options)


def export_gguf(model_dir, out_root, **kwargs):
    """`api.export_gguf`, refusing checkpoints with ShortV frozen layers before any work."""
    from edgevlm.freeze import refuse_gguf

    refuse_gguf(model_dir)
    return _export_gguf(model_dir, out_root, **kwargs)


__all__ = ["GGUF_QUANTS", "MMPROJ_TYPES", "check_gguf_quant", "export_gguf"]
