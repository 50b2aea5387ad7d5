"""edgevlm: prune, quantize, export and benchmark vision-language models for the edge.

The Python API mirrors the CLI's stages (see edgevlm.api and the README's "Python API"):

    import edgevlm
    vlm = edgevlm.load("tiny:smolvlm")
    scores = edgevlm.score(vlm, edgevlm.calibration("builtin:8"), "bi")
    plan = edgevlm.make_plan(vlm, scores, ratio=0.25)
    edgevlm.prune_(vlm, plan, "out/pruned")
    edgevlm.export(vlm, "out/onnx", "onnx")

Importing the package stays light: the API's functions load on first use and import torch
only when they need it, so a device install without torch imports edgevlm.runtimes.
"""

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562)
_API = {name: "edgevlm.api" for name in (
    "load", "calibration", "score", "make_plan", "prune_", "export", "verify", "run", "bench",
    "OnnxExport", "GgufExport", "EXPORT_CONFIGS")}
_API.update({"PrunePlan": "edgevlm.types", "LayerScores": "edgevlm.types"})

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'edgevlm' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
