"""LLaVA: `CLIPImageProcessorPil` (resize the shortest edge, centre crop) or
`LlavaImageProcessorPil` (optionally pad to a square first), and `LlavaProcessor`'s <image>
expansion to one token per patch (+ CLS, - 1 for the 'default' feature strategy)."""

from __future__ import annotations

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
    center_crop,
    flag,
    output_size,
    resample_of,
    resize,
    setting,
    size_dict,
)

BICUBIC = 3


def pad_to_square(pixels: np.ndarray, background: tuple[int, ...]) -> np.ndarray:
    """`LlavaImageProcessorPil.pad_to_square` on (H, W, C): centre the image on a square."""
    height, width = pixels.shape[:2]
    if height == width:
        return pixels
    side = max(height, width)
    out = np.empty((side, side, pixels.shape[2]), dtype=pixels.dtype)
    out[:] = np.array(background, dtype=pixels.dtype)
    if width > height:
        start = (side - height) // 2
        out[start:start + height] = pixels
    else:
        start = (side - width) // 2
        out[:, start:start + width] = pixels
    return out


class LlavaProcessor(FamilyProcessor):
    """LLaVA with a CLIP-style image processor."""

    family = "llava"

    def __init__(self, files: CheckpointFiles, tokens):
        image, processor = files.image, files.processor
        self.do_resize = flag(image, "do_resize", True)
        self.size = size_dict(setting(image, "size", {"shortest_edge": 224}), default_to_square=False)
        self.resample = resample_of(image, BICUBIC)
        self.do_center_crop = flag(image, "do_center_crop", True)
        self.crop_size = size_dict(setting(image, "crop_size", {"height": 224, "width": 224}),
                                   default_to_square=True)
        self.normalize = Normalization.from_settings(image, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        kind = str(image.get("image_processor_type", ""))
        # Only LlavaImageProcessor pads to a square; CLIP's do_pad pads a batch to one size.
        self.pad_square = kind.startswith("LlavaImageProcessor") and flag(image, "do_pad", False)
        # Where the processor config lacks them, the model config's values keep the token count
        # consistent with the vision tower (transformers' processor would fail or miscount).
        vision = files.config.get("vision_config") or {}
        patch_size = setting(processor, "patch_size", vision.get("patch_size"))
        if not patch_size:
            raise UsageError("the LLaVA processor config has no patch_size",
                             "save the processor with patch_size set (LlavaProcessor(patch_size=...))")
        self.patch_size = int(patch_size)
        self.additional_tokens = int(setting(processor, "num_additional_image_tokens", 0))
        self.strategy = setting(processor, "vision_feature_select_strategy",
                                files.config.get("vision_feature_select_strategy"))
        # LlavaProcessor prefers the tokenizer's image_token over its own setting.
        self.placeholder = tokens.special_tokens.get("image_token") or processor.get(
            "image_token", families.family(self.family).placeholder)

    def pixels(self, pixels: np.ndarray) -> np.ndarray:
        """One (H, W, 3) uint8 image -> (3, h, w) float32."""
        if self.pad_square:
            mean = self.normalize.image_mean
            pixels = pad_to_square(pixels, tuple(int(m * 255) for m in mean))
        if self.do_resize:
            pixels = resize(pixels, *output_size(*pixels.shape[:2], self.size), self.resample)
        if self.do_center_crop:
            pixels = center_crop(pixels, int(self.crop_size["height"]), int(self.crop_size["width"]))
        return self.normalize(pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens for a processed image of this size."""
        n = (height // self.patch_size) * (width // self.patch_size) + self.additional_tokens
        return n - 1 if self.strategy == "default" else n

    def process_images(self, images) -> ImageInputs:
        arrays = [self.pixels(np.asarray(img)) for img in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise UsageError("these images process to different sizes and cannot be batched",
                             "enable do_center_crop (or a fixed size) in the processor config")
        replacements = [self.placeholder * self.num_image_tokens(*a.shape[1:]) for a in arrays]
        return ImageInputs({"pixel_values": np.stack(arrays)}, replacements)
