"""GGUF export (text model + mmproj) for llama.cpp, verified in llama.cpp itself.

Entry points: `export_gguf` (write + verify, returns the manifest), `check_gguf_quant`
(argument check before any work) and `GGUF_QUANTS` (what exists and how it is made).
"""

from __future__ import annotations

from edgevlm.export.gguf_export.api import check_gguf_quant, export_gguf
from edgevlm.export.gguf_export.quantize import GGUF_QUANTS, MMPROJ_TYPES

__all__ = ["GGUF_QUANTS", "MMPROJ_TYPES", "check_gguf_quant", "export_gguf"]
