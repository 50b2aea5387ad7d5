"""Torch-free input pipeline for the on-device runners: per-family image preprocessing in
numpy/Pillow that reproduces transformers' PIL image processors, chat templates via jinja2,
and tokenisation with `tokenizers`, all driven by a checkpoint or export folder's files.

    pre = load_preprocessor("out/onnx")
    inputs = pre("cat.jpg", "What is in the image?")   # dict of numpy arrays
    text = pre.decode(generated_ids)
"""

from .common import CheckpointFiles, ImageInputs, open_image
from .pipeline import PROCESSORS, Preprocessor, load_preprocessor
from .prompt import ChatTokenizer, StreamDecoder

__all__ = [
    "PROCESSORS",
    "ChatTokenizer",
    "CheckpointFiles",
    "ImageInputs",
    "Preprocessor",
    "StreamDecoder",
    "load_preprocessor",
    "open_image",
]
