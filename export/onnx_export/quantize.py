"""Quantization of the torch.onnx graphs (the decoder is quantized by the builder itself)."""

from __future__ import annotations

import logging
from pathlib import Path

from edgevlm.errors import require
from edgevlm.ui import quieted


def quantize_int8_dynamic(src: Path, dest: Path) -> Path:
    """Dynamic INT8 (weights int8, activations quantized at run time): transformers.js'
    `_quantized` flavour."""
    require("onnxruntime", "onnx", "INT8 quantization of ONNX graphs")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # It logs an advice to pre-process on the root logger every call; the graphs are already
    # shape-inferred by the exporter.
    with quieted(logs=logging.WARNING, stdout=True):
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    return dest


def quantize_q4(src: Path, dest: Path, block_size: int = 32, accuracy_level: int = 4) -> Path:
    """4-bit MatMulNBits (symmetric, block 32, accuracy level 4): the same weight format the
    builder's int4 decoder uses, for graphs the builder did not make."""
    require("onnxruntime", "onnx", "4-bit quantization of ONNX graphs")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with quieted(logs=logging.INFO):
        model = onnx.load(str(src))
        quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True,
                                         accuracy_level=accuracy_level)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dest), use_external_data_format=False)
    return dest
