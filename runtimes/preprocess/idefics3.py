"""SmolVLM / Idefics3: `SmolVLMImageProcessorPil` / `Idefics3ImageProcessorPil` (resize the
longest edge, resize to whole tiles, split into tiles + a global image, pad, pixel mask) and the
processors' <fake_token_around_image><row_r_col_c><image>*n ... <global-img> prompt layout."""

from __future__ import annotations

import math

import numpy as np

from edgevlm.errors import UsageError

from .. import families
from .common import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    CheckpointFiles,
    FamilyProcessor,
    ImageInputs,
    Normalization,
    flag,
    resample_of,
    resize,
    setting,
)

LANCZOS = 1
MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on either side


def _even_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Longest edge to max_len, the other side by aspect ratio rounded up to even (min 1)."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    elif height > width:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The processor's first resize: longest edge to `longest_edge` (up or down)."""
    height, width = _even_to_max_len(height, width, longest_edge)
    return _below_upper_bound(height, width, MAX_IMAGE_SIZE)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """`resize_for_vision_encoder`: both sides rounded up to whole tiles, by aspect ratio."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect_ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect_ratio)
        width = math.ceil(width / tile) * tile
    return height, width


class Idefics3Processor(FamilyProcessor):
    """SmolVLM and Idefics3 (the same image processor; the prompt layouts differ only in where
    the global-image tag comes from)."""

    family = "smolvlm"

    def __init__(self, files: CheckpointFiles, tokens):
        image, processor = files.image, files.processor
        self.do_resize = flag(image, "do_resize", True)
        self.size = dict(setting(image, "size", {"longest_edge": 4 * 364}))
        self.max_image_size = dict(setting(image, "max_image_size", {"longest_edge": 364}))
        self.resample = resample_of(image, LANCZOS)
        self.do_image_splitting = flag(image, "do_image_splitting", True)
        self.do_pad = flag(image, "do_pad", True)
        self.normalize = Normalization.from_settings(image, IMAGENET_STANDARD_MEAN,
                                                     IMAGENET_STANDARD_STD)
        self.image_seq_len = int(setting(processor, "image_seq_len", 169))
        special = tokens.special_tokens
        placeholder = families.family(self.family).placeholder
        self.placeholder = special.get("image_token", placeholder)
        self.fake_image_token = special.get("fake_image_token", "<fake_token_around_image>")
        if files.config.get("model_type") == "idefics3":
            # Idefics3Processor hard-codes its tokens; SmolVLMProcessor reads the tokenizer's.
            self.placeholder, self.fake_image_token = placeholder, "<fake_token_around_image>"
            self.global_image_token = "<global-img>"
        else:
            self.global_image_token = special.get("global_image_token", "<global-img>")

    def _first_resize(self, pixels: np.ndarray) -> np.ndarray:
        if not self.do_resize:
            return pixels
        size = self.size
        if size.get("longest_edge"):
            height, width = longest_edge_size(*pixels.shape[:2], int(size["longest_edge"]))
        elif size.get("height") and size.get("width"):
            height, width = int(size["height"]), int(size["width"])
        else:
            raise UsageError(f"unsupported image size setting {size!r}",
                             "the processor config needs size.longest_edge or height/width")
        return resize(pixels, height, width, self.resample)

    def split(self, pixels: np.ndarray) -> tuple[list[np.ndarray], int, int]:
        """Tiles (row-major) + the global image, with the row and column counts (0, 0: no split)."""
        tile = int(self.max_image_size["longest_edge"])
        if not self.do_image_splitting:
            return [resize(pixels, tile, tile, self.resample)], 0, 0
        height, width = tile_multiple_size(*pixels.shape[:2], tile)
        pixels = resize(pixels, height, width, self.resample)
        if height <= tile and width <= tile:
            return [pixels], 0, 0
        rows = (height - tile) // tile + 1
        cols = (width - tile) // tile + 1
        frames = [pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                  for r in range(rows) for c in range(cols)]
        frames.append(resize(pixels, tile, tile, self.resample))
        return frames, rows, cols

    def prompt(self, rows: int, cols: int) -> str:
        """The text one image's placeholder expands to."""
        tokens = self.placeholder * self.image_seq_len
        global_part = f"{self.fake_image_token}{self.global_image_token}{tokens}{self.fake_image_token}"
        if rows == 0 and cols == 0:
            return global_part
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += f"{self.fake_image_token}<row_{r + 1}_col_{c + 1}>{tokens}"
            text += "\n"
        return f"{text}\n{global_part}"

    def process_images(self, images) -> ImageInputs:
        frames, replacements = [], []
        for img in images:
            tiles, rows, cols = self.split(self._first_resize(np.asarray(img)))
            frames += [self.normalize(t) for t in tiles]
            replacements.append(self.prompt(rows, cols))
        if not self.do_pad:
            if len({f.shape for f in frames}) > 1:
                raise UsageError("tiles of different sizes need do_pad",
                                 "keep do_pad on in the processor config")
            return ImageInputs({"pixel_values": np.stack(frames)[None]}, replacements)
        height = max(f.shape[1] for f in frames)
        width = max(f.shape[2] for f in frames)
        pixel_values = np.zeros((1, len(frames), frames[0].shape[0], height, width), np.float32)
        mask = np.zeros((1, len(frames), height, width), dtype=np.int64)
        for i, frame in enumerate(frames):
            pixel_values[0, i, :, :frame.shape[1], :frame.shape[2]] = frame
            mask[0, i, :frame.shape[1], :frame.shape[2]] = 1
        return ImageInputs({"pixel_values": pixel_values, "pixel_attention_mask": mask},
                           replacements)
