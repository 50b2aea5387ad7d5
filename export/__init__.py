"""Export targets (ONNX, GGUF), quantization per target, and the manifest."""
