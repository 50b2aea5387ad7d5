"""`load_preprocessor(folder)`: image + prompt -> the numpy arrays the model takes, from the
folder's files alone (config.json picks the family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.errors import UnsupportedModelError, UsageError

from .. import families
from .common import CheckpointFiles, FamilyProcessor, ImageInputs, open_image
from .gemma3 import Gemma3Processor
from .idefics3 import Idefics3Processor
from .llava import LlavaProcessor
from .prompt import ChatTokenizer, StreamDecoder
from .qwen2_vl import Qwen2VLProcessor

# family (of config.json's model_type, by the family table) -> the family's processing.
PROCESSORS: dict[str, type[FamilyProcessor]] = {
    "qwen2-vl": Qwen2VLProcessor,
    "qwen2.5-vl": Qwen2VLProcessor,
    "smolvlm": Idefics3Processor,
    "llava": LlavaProcessor,
    "gemma3": Gemma3Processor,
}


class Preprocessor:
    """Everything between a user's (image, prompt) and the model's input arrays.

    `pre(image, prompt)` returns what `processor(text=[chat_text], images=[[image]],
    return_tensors="np")` returns in transformers: input_ids, attention_mask (int64, batch 1),
    the family's token types (Qwen: mm_token_type_ids, Gemma 3: token_type_ids) and its image
    arrays (pixel_values; Qwen: image_grid_thw; SmolVLM: pixel_attention_mask).
    """

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self.config = files.config
        self.model_type = files.config.get("model_type")
        spec = families.for_model_type(self.model_type)
        if spec is None or spec.name not in PROCESSORS:
            raise UnsupportedModelError(
                f"no preprocessing for model_type '{self.model_type}' in {files.folder}",
                "supported model types: " + ", ".join(
                    t for f in families.TABLE if f.name in PROCESSORS for t in f.model_types))
        self.tokens = ChatTokenizer(files)
        self.family = spec.name
        self.images = PROCESSORS[spec.name](files, self.tokens)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the tokenizer's EOS plus generation_config's eos_token_id."""
        return self.tokens.eos_token_ids

    @property
    def image_token_id(self) -> int | None:
        """The id at whose positions the image features go (from config.json)."""
        token_id = families.image_token_id(self.config)
        if token_id is not None:
            return token_id
        token = getattr(self.images, "image_token", None) or self.images.placeholder
        return self.tokens.token_id(token)

    def chat_text(self, prompt: str, num_images: int = 1) -> str:
        """The chat-template text (image placeholders not yet expanded)."""
        return self.tokens.chat_text(prompt, num_images)

    def process_images(self, images) -> ImageInputs:
        """Image arrays and per-image placeholder expansions for images or paths."""
        return self.images.process_images([open_image(i) for i in images])

    def expand(self, text: str, replacements: list[str]) -> str:
        """Replace each image placeholder in `text`, in order, by its expansion."""
        placeholder = self.images.placeholder
        parts = text.split(placeholder)
        if len(parts) - 1 != len(replacements):
            raise UsageError(
                f"the prompt has {len(parts) - 1} {placeholder} placeholders for "
                f"{len(replacements)} images", "give one image per placeholder")
        out = parts[0]
        for replacement, part in zip(replacements, parts[1:], strict=True):
            out += replacement + part
        return out

    def encode(self, text: str) -> dict[str, np.ndarray]:
        """input_ids / attention_mask (1, seq) int64, plus the family's token types."""
        ids = np.array([self.tokens.encode_chat(text)], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                **self.images.text_outputs(ids)}

    def __call__(self, image, prompt: str) -> dict[str, np.ndarray]:
        """Model inputs for one chat turn: `image` is a PIL image, a path, a list of them, or
        None (text only); `prompt` is the user's text."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        text = self.chat_text(prompt, len(images))
        if not images:
            return self.encode(text)
        processed = self.process_images(images)
        return {**self.encode(self.expand(text, processed.replacements)), **processed.arrays}

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text for generated ids."""
        return self.tokens.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental decoder: `.push(id)` returns the new text, `.flush()` the rest."""
        return self.tokens.stream(skip_special_tokens=skip_special_tokens)


def load_preprocessor(folder: str | Path) -> Preprocessor:
    """The preprocessor of a saved checkpoint or export folder (config.json, processor and
    tokenizer files, chat template)."""
    return Preprocessor(CheckpointFiles.read(folder))
