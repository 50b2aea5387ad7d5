"""Processor classes that work without torchvision, and loading them by name.

transformers' Qwen2-VL, Qwen2.5-VL and SmolVLM processors require a video processor,
which needs torchvision (CUDA-only on the registries here). These subclasses keep only
the image processor and tokenizer; they save and load the standard files.
"""

from __future__ import annotations

from pathlib import Path


def _image_only(base):
    class ImageOnly(base):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = base.__name__
    return ImageOnly


def _classes() -> dict:
    import transformers as tf

    qwen2 = _image_only(tf.Qwen2VLProcessor)
    qwen25 = _image_only(tf.Qwen2_5_VLProcessor)
    smol_base = _image_only(tf.SmolVLMProcessor)

    class SmolVLMProcessor(smol_base):
        # The stock signature has a required video_processor positional argument.
        def __init__(self, image_processor=None, tokenizer=None, image_seq_len=169,
                     chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len,
                             chat_template=chat_template, **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # The stock method reads video_processor.num_frames; images need none of it.
            return tf.ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    return {
        "Qwen2VLProcessor": qwen2,
        "Qwen2_5_VLProcessor": qwen25,
        "SmolVLMProcessor": SmolVLMProcessor,
        "Idefics3Processor": tf.Idefics3Processor,
        "LlavaProcessor": tf.LlavaProcessor,
        "Gemma3Processor": tf.Gemma3Processor,
    }


_CACHE: dict = {}


def processor_class(name: str):
    """The torchvision-free processor class for a processor class name."""
    if not _CACHE:
        _CACHE.update(_classes())
    return _CACHE[name]


def load_processor(path: str | Path, adapter, **hub_kwargs):
    """Load the processor of a saved model with our torchvision-free classes."""
    return processor_class(adapter.processor_class).from_pretrained(str(path), **hub_kwargs)
