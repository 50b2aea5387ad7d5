"""Quantization types: which exist, how each is made, and per-tensor type choice."""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import UsageError


@dataclass(frozen=True)
class GGUFQuant:
    """One GGUF quantization choice for the text model."""

    name: str
    method: str  # "numpy" (written directly with gguf's quantizers) or "llama.cpp"
    ggml_type: str  # main tensor type (gguf.GGMLQuantizationType name)
    block: int  # row length must be a multiple of this, or the tensor falls back
    ftype: str  # llama_cpp LLAMA_FTYPE_* name (file type key / llama_model_quantize)
    description: str


GGUF_QUANTS: dict[str, GGUFQuant] = {q.name: q for q in [
    GGUFQuant("f32", "numpy", "F32", 1, "LLAMA_FTYPE_ALL_F32", "32-bit float, exact"),
    GGUFQuant("f16", "numpy", "F16", 1, "LLAMA_FTYPE_MOSTLY_F16", "16-bit float"),
    GGUFQuant("bf16", "numpy", "BF16", 1, "LLAMA_FTYPE_MOSTLY_BF16", "bfloat16"),
    GGUFQuant("q8_0", "numpy", "Q8_0", 32, "LLAMA_FTYPE_MOSTLY_Q8_0", "8-bit, blocks of 32"),
    GGUFQuant("q4_0", "numpy", "Q4_0", 32, "LLAMA_FTYPE_MOSTLY_Q4_0", "4-bit, blocks of 32"),
    GGUFQuant("q4_k_m", "llama.cpp", "Q4_K", 256, "LLAMA_FTYPE_MOSTLY_Q4_K_M",
              "4-bit K-quant mix (llama_model_quantize)"),
    GGUFQuant("q4_k_s", "llama.cpp", "Q4_K", 256, "LLAMA_FTYPE_MOSTLY_Q4_K_S",
              "4-bit K-quant, small (llama_model_quantize)"),
    GGUFQuant("q5_k_m", "llama.cpp", "Q5_K", 256, "LLAMA_FTYPE_MOSTLY_Q5_K_M",
              "5-bit K-quant mix (llama_model_quantize)"),
    GGUFQuant("q6_k", "llama.cpp", "Q6_K", 256, "LLAMA_FTYPE_MOSTLY_Q6_K",
              "6-bit K-quant (llama_model_quantize)"),
    GGUFQuant("q3_k_m", "llama.cpp", "Q3_K", 256, "LLAMA_FTYPE_MOSTLY_Q3_K_M",
              "3-bit K-quant mix (llama_model_quantize)"),
]}

MMPROJ_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}


def resolve_quant(quant: str) -> GGUFQuant:
    key = quant.strip().lower().replace("-", "_")
    if key not in GGUF_QUANTS:
        raise UsageError(f"unknown GGUF quant type '{quant}'",
                         f"use one of: {', '.join(GGUF_QUANTS)}")
    return GGUF_QUANTS[key]


def resolve_mmproj_type(kind: str) -> str:
    key = kind.strip().lower()
    if key not in MMPROJ_TYPES:
        raise UsageError(f"unknown mmproj type '{kind}'", f"use one of: {', '.join(MMPROJ_TYPES)}")
    return key


def tensor_type(name: str, shape: tuple[int, ...], main: str, block: int, *,
                keep_f32: bool = False) -> tuple[str, bool]:
    """(ggml type name, fell_back) for one tensor at the file's main type.

    1-D tensors (norms, biases) and `keep_f32` tensors stay F32, as llama.cpp expects; a
    matrix whose row length is not a multiple of the block size falls back to F16.
    """
    if keep_f32 or len(shape) < 2 or main == "F32":
        return "F32", False
    if main in ("F16", "BF16"):
        return main, False
    if shape[-1] % block:
        return "F16", True
    return main, False


def encode(data, type_name: str):
    """numpy float32 -> the bytes array gguf writes for `type_name` (F32 stays float32)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if type_name == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if type_name == "F16":
        return np.ascontiguousarray(data, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32),
                           GGMLQuantizationType[type_name])


def nbytes(shape: tuple[int, ...], type_name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    n = 1
    for d in shape:
        n *= d
    return n // block * size
