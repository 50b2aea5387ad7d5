"""Qwen2-VL / Qwen2.5-VL: `Qwen2VLImageProcessorPil` (smart_resize, patchify into rows of
C*T*P*P values, image_grid_thw) and `Qwen2VLProcessor`'s <|image_pad|> expansion."""

from __future__ import annotations

import math

import numpy as np

from edgevlm.errors import UsageError

from .. import families
from .common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CheckpointFiles,
    FamilyProcessor,
    ImageInputs,
    Normalization,
    flag,
    resample_of,
    resize,
    setting,
)

BICUBIC = 3


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Both sides multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect
    ratio kept as closely as possible (transformers' `smart_resize`, same rounding)."""
    if max(height, width) / min(height, width) > 200:
        raise UsageError(
            f"image aspect ratio {max(height, width) / min(height, width):.0f} is above 200",
            "crop the image; Qwen2-VL refuses more extreme aspect ratios")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
    """(C, H, W) -> (grid_h * grid_w, C * T * P * P) rows in merge-window order, plus the grid."""
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    if grid_h % merge_size or grid_w % merge_size or height % patch_size or width % patch_size:
        raise UsageError(f"a {height}x{width} image does not split into {patch_size}px patches "
                         f"merged {merge_size}x{merge_size}",
                         "keep do_resize on in the processor config")
    patches = image.reshape(channels, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
    # A still image fills every temporal slot with the same frame.
    patches = np.broadcast_to(patches[:, :, :, :, :, None],
                              (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]))
    flat = patches.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size ** 2)
    return np.ascontiguousarray(flat, dtype=np.float32), grid_h, grid_w


def pixel_bounds(image: dict) -> tuple[int, int]:
    """(min_pixels, max_pixels) from the settings, old and new spellings alike."""
    size = dict(image.get("size") or {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    if "min_pixels" in size:
        size["shortest_edge"] = size.pop("min_pixels")
    if "max_pixels" in size:
        size["longest_edge"] = size.pop("max_pixels")
    if image.get("min_pixels") is not None:
        size["shortest_edge"] = image["min_pixels"]
    if image.get("max_pixels") is not None:
        size["longest_edge"] = image["max_pixels"]
    if not size.get("shortest_edge") or not size.get("longest_edge"):
        raise UsageError(f"Qwen2-VL image size setting {size} lacks shortest_edge/longest_edge",
                         "the processor config needs size.shortest_edge and size.longest_edge")
    return int(size["shortest_edge"]), int(size["longest_edge"])


class Qwen2VLProcessor(FamilyProcessor):
    """Qwen2-VL and Qwen2.5-VL (same image processor and placeholder expansion)."""

    family = "qwen2-vl"
    token_type_key = "mm_token_type_ids"

    def __init__(self, files: CheckpointFiles, tokens):
        image = files.image
        self.family = families.for_config(files.config).name
        self.do_resize = flag(image, "do_resize", True)
        self.min_pixels, self.max_pixels = pixel_bounds(image)
        self.resample = resample_of(image, BICUBIC)
        self.patch_size = int(setting(image, "patch_size", 14))
        self.temporal_patch_size = int(setting(image, "temporal_patch_size", 2))
        self.merge_size = int(setting(image, "merge_size", 2))
        self.normalize = Normalization.from_settings(image, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        self.placeholder = tokens.special_tokens.get("image_token", families.family(self.family).placeholder)
        video = tokens.special_tokens.get("video_token", "<|video_pad|>")
        self._type_ids = {tid: kind for tid, kind in ((tokens.token_id(video), 2),
                                                      (tokens.token_id(self.placeholder), 1))
                          if tid is not None}

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image is resized to before patchifying."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.patch_size * self.merge_size,
                            self.min_pixels, self.max_pixels)

    def process_images(self, images) -> ImageInputs:
        rows, grids = [], []
        for img in images:
            pixels = np.asarray(img)
            height, width = self.resized_size(*pixels.shape[:2])
            pixels = resize(pixels, height, width, self.resample) if self.do_resize else pixels
            patches, grid_h, grid_w = patchify(self.normalize(pixels), self.patch_size,
                                               self.merge_size, self.temporal_patch_size)
            rows.append(patches)
            grids.append([1, grid_h, grid_w])
        grid = np.array(grids, dtype=np.int64).reshape(-1, 3)
        per_image = [int(np.prod(g)) // self.merge_size ** 2 for g in grid]
        arrays = {"pixel_values": np.concatenate(rows, axis=0), "image_grid_thw": grid}
        return ImageInputs(arrays, [self.placeholder * n for n in per_image])

    def image_token_ids(self) -> dict[int, int]:
        return self._type_ids
