"""Thin, torch-free runners for exported models (onnxruntime, llama.cpp)."""
