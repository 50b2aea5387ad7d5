"""Gemma 3: `Gemma3ImageProcessorPil` (resize to a fixed size; optional pan-and-scan crops) and
`Gemma3Processor`'s <start_of_image> expansion to
"\\n\\n<start_of_image>" + <image_soft_token> * image_seq_length + "<end_of_image>\\n\\n"."""

from __future__ import annotations

import itertools
import math

import numpy as np

from .. import families
from .common import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    CheckpointFiles,
    FamilyProcessor,
    ImageInputs,
    Normalization,
    flag,
    output_size,
    resample_of,
    resize,
    setting,
    size_dict,
)

BILINEAR = 2


def pan_and_scan(pixels: np.ndarray, min_crop_size: int, max_num_crops: int,
                 min_ratio_to_activate: float) -> list[np.ndarray]:
    """Crops of a very wide or tall (H, W, C) image (transformers' `pan_and_scan`); [] if none."""
    height, width = pixels.shape[:2]
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        num_w = min(int(math.floor(width / min_crop_size)), int(math.floor(width / height + 0.5)))
        num_w, num_h = min(max_num_crops, max(2, num_w)), 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        num_h = min(int(math.floor(height / min_crop_size)), int(math.floor(height / width + 0.5)))
        num_h, num_w = min(max_num_crops, max(2, num_h)), 1
    crop_w, crop_h = int(math.ceil(width / num_w)), int(math.ceil(height / num_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [pixels[y:y + crop_h, x:x + crop_w]
            for y, x in itertools.product([crop_h * i for i in range(num_h)],
                                          [crop_w * i for i in range(num_w)])]


class Gemma3Processor(FamilyProcessor):
    """Gemma 3 with its SigLIP image processor."""

    family = "gemma3"
    token_type_key = "token_type_ids"

    def __init__(self, files: CheckpointFiles, tokens):
        image, processor = files.image, files.processor
        self.do_resize = flag(image, "do_resize", True)
        self.size = size_dict(setting(image, "size", {"height": 224, "width": 224}),
                              default_to_square=True)
        self.resample = resample_of(image, BILINEAR)
        self.normalize = Normalization.from_settings(image, IMAGENET_STANDARD_MEAN,
                                                     IMAGENET_STANDARD_STD)
        # Gemma3Processor passes its own pan-and-scan defaults to every image processor call,
        # over the saved settings: pan-and-scan is off unless a caller turns it on here.
        self.do_pan_and_scan = False
        self.pan_and_scan_min_crop_size = 256
        self.pan_and_scan_max_num_crops = 4
        self.pan_and_scan_min_ratio_to_activate = 1.2
        special = tokens.special_tokens
        spec = families.family(self.family)
        self.placeholder = special.get("boi_token", spec.placeholder)
        self.image_token = special.get("image_token", spec.image_token)
        self.image_seq_length = int(setting(processor, "image_seq_length", 256))
        soft = self.image_token * self.image_seq_length
        eoi = special.get("eoi_token", "<end_of_image>")
        self.full_image_sequence = f"\n\n{self.placeholder}{soft}{eoi}\n\n"
        self._type_ids = {tid: 1 for tid in [tokens.token_id(self.image_token)] if tid is not None}

    def _one(self, pixels: np.ndarray) -> np.ndarray:
        if self.do_resize:
            pixels = resize(pixels, *output_size(*pixels.shape[:2], self.size), self.resample)
        return self.normalize(pixels)

    def replacement(self, num_crops: int) -> str:
        """The text an image's <start_of_image> becomes, with pan-and-scan crops if any."""
        if not num_crops:
            return self.full_image_sequence
        return (f"Here is the original image {self.full_image_sequence} and here are some crops "
                "to help you see better " + " ".join([self.full_image_sequence] * num_crops))

    def process_images(self, images) -> ImageInputs:
        arrays, replacements = [], []
        for img in images:
            pixels = np.asarray(img)
            crops = (pan_and_scan(pixels, self.pan_and_scan_min_crop_size,
                                  self.pan_and_scan_max_num_crops,
                                  self.pan_and_scan_min_ratio_to_activate)
                     if self.do_pan_and_scan else [])
            arrays += [self._one(p) for p in [pixels, *crops]]
            replacements.append(self.replacement(len(crops)))
        return ImageInputs({"pixel_values": np.stack(arrays)}, replacements)

    def image_token_ids(self) -> dict[int, int]:
        return self._type_ids
