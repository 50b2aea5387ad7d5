"""Export targets, registered by name; their code is imported only when used."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgevlm.registry import Registry


@dataclass(frozen=True)
class ExportTarget:
    """An export format: where its writer lives and what it needs."""

    name: str
    module: str  # imported lazily: heavy optional dependencies
    export_fn: str
    check_fn: str  # check_fn(quant, config=None, **options): UsageError before any work
    extra: str  # pip extra that installs its dependencies
    description: str
    quants: tuple[str, ...]
    default_quant: str
    requires: tuple[tuple[str, str], ...] = ()  # (import name, pip name) of its dependencies

    def export(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.export_fn)(*args, **kwargs)

    def check(self, quant: str, config=None, **options) -> None:
        """Dependencies present, quantization valid (and, given a config, the model fits):
        everything that can fail before any work."""
        from edgevlm.errors import require

        for module, package in self.requires:
            require(module, self.extra, f"{self.name} export", package=package)
        getattr(importlib.import_module(self.module), self.check_fn)(quant, config, **options)


TARGETS: Registry[ExportTarget] = Registry("export target")
TARGETS.add("onnx", ExportTarget(
    name="onnx", module="edgevlm.export.onnx_export", export_fn="export_onnx",
    check_fn="check_onnx_target", extra="onnx",
    description="onnxruntime / transformers.js layout: vision encoder, embeddings, KV-cache decoder",
    quants=("none", "int8", "q4"), default_quant="none",
    requires=(("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript"),
              ("onnxruntime_genai", "onnxruntime-genai"))))
TARGETS.add("gguf", ExportTarget(
    name="gguf", module="edgevlm.export.gguf_export", export_fn="export_gguf",
    check_fn="check_gguf_quant", extra="gguf",
    description="llama.cpp: text model + mmproj",
    quants=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"), default_quant="f16",
    requires=(("gguf", "gguf"), ("llama_cpp", "llama-cpp-python"))))
