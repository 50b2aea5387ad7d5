"""What every family shares: the checkpoint's files, image loading, and the resize / rescale /
normalise steps of transformers' PIL image processors (`PilBackend`), reproduced value for value.

transformers converts the channels-first uint8 array back to a PIL image for every resize, so
resizing a PIL RGB image with the same filter gives the same pixels; rescale is done in float64
and cast to float32, normalise in float32, exactly as `image_transforms.rescale/normalize` do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edgevlm.errors import UsageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


def read_json(path: Path) -> dict | None:
    """A JSON file's content, None when the file is absent; a clear error when it is broken."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}",
                         "re-export the model; the folder's files are damaged") from exc


@dataclass
class CheckpointFiles:
    """The JSON files of a checkpoint or export folder that preprocessing depends on."""

    folder: Path
    config: dict
    image: dict  # image processor settings
    processor: dict  # processor-level settings (image_seq_len, patch_size, ...)
    tokenizer_config: dict = field(default_factory=dict)
    generation_config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | Path) -> CheckpointFiles:
        """Read config.json, processor_config.json / preprocessor_config.json and tokenizer files.

        transformers 5 keeps the image processor settings in processor_config.json under
        "image_processor"; older folders (and transformers.js layouts) have them in
        preprocessor_config.json.
        """
        folder = Path(folder)
        config = read_json(folder / "config.json")
        if config is None:
            raise UsageError(f"{folder} has no config.json",
                             "point at a saved checkpoint or an export folder (with config.json)")
        processor = dict(read_json(folder / "processor_config.json") or {})
        image = processor.pop("image_processor", None)
        if image is None:
            image = read_json(folder / "preprocessor_config.json")
            if image is None:
                raise UsageError(
                    f"{folder} has no image processor settings "
                    "(processor_config.json / preprocessor_config.json)",
                    "save the processor next to the model (processor.save_pretrained)")
            # Old layouts keep processor-level keys in the same file.
            processor = {**image, **processor}
        return cls(folder=folder, config=config, image=image, processor=processor,
                   tokenizer_config=read_json(folder / "tokenizer_config.json") or {},
                   generation_config=read_json(folder / "generation_config.json") or {})


def open_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path.

    Paths are opened the way transformers' `load_image` does (EXIF orientation applied, then
    `convert("RGB")`); PIL images are converted like `PilBackend.process_image`
    (transparency composited onto white).
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UsageError(f"cannot read image {image}: {exc}",
                             "pass a readable image file (PNG, JPEG, ...)") from exc
    raise UsageError(f"unsupported image type {type(image).__name__}",
                     "pass a PIL.Image.Image or a path to an image file")


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL images: alpha is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 array with PIL, as `image_transforms.resize` does."""
    if pixels.shape[:2] == (height, width):
        # PIL returns an identical copy for a same-size resize with any filter.
        return pixels
    resized = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling(resample))
    return np.asarray(resized)


def size_dict(size, *, default_to_square: bool) -> dict:
    """transformers' `get_size_dict`: an int or (h, w) pair becomes the dict form."""
    if isinstance(size, dict):
        return dict(size)
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise UsageError(f"unsupported image size setting {size!r}",
                     "use a dict such as {'height': 224, 'width': 224} in the processor config")


def output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """The (height, width) `PilBackend.resize` resizes to for a size dict."""
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        return size_with_aspect_ratio(height, width, shortest, longest)
    if shortest:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if size.get("max_height") and size.get("max_width"):
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise UsageError(f"unsupported image size setting {size!r}",
                     "the processor config needs height/width, shortest_edge or max_height/max_width")


def size_with_aspect_ratio(height: int, width: int, size: int, max_size: int | None):
    """transformers' `get_size_with_aspect_ratio` (shortest edge, capped longest edge)."""
    raw_size = None
    if max_size is not None:
        min_original, max_original = float(min(height, width)), float(max(height, width))
        if max_original / min_original * size > max_size:
            raw_size = max_size * min_original / max_original
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        scale_from = raw_size if raw_size is not None else size
        return int(scale_from * height / width), size
    scale_from = raw_size if raw_size is not None else size
    return size, int(scale_from * width / height)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' numpy `center_crop` on (H, W, C): zero-pads first when the image is smaller."""
    orig_h, orig_w = pixels.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0 and top + height <= orig_h and left + width <= orig_w:
        return pixels[top:top + height, left:left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad, left_pad = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)
    padded[top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


@dataclass
class Normalization:
    """The rescale and normalise settings shared by every image processor."""

    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD

    @classmethod
    def from_settings(cls, image: dict, mean, std) -> Normalization:
        """Read from the image processor settings, with the processor class's defaults."""
        return cls(
            do_rescale=flag(image, "do_rescale", True),
            rescale_factor=float(setting(image, "rescale_factor", 1 / 255)),
            do_normalize=flag(image, "do_normalize", True),
            image_mean=_channels(setting(image, "image_mean", mean)),
            image_std=_channels(setting(image, "image_std", std)),
        )

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, C) uint8 -> (C, H, W) float32, as rescale then normalise do in transformers."""
        out = pixels
        if self.do_rescale:
            out = (out.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(out.dtype, np.floating):
                out = out.astype(np.float32)
            mean = np.array(self.image_mean, dtype=out.dtype)
            std = np.array(self.image_std, dtype=out.dtype)
            out = (out - mean) / std
        if not np.issubdtype(out.dtype, np.floating):
            out = out.astype(np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))


def setting(settings: dict, key: str, default):
    """A setting, or the processor class's default when it is absent or null."""
    value = settings.get(key)
    return default if value is None else value


def flag(settings: dict, key: str, default: bool) -> bool:
    """A boolean setting with its default."""
    return bool(setting(settings, key, default))


def _channels(value) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


def resample_of(settings: dict, default: int) -> int:
    """The PIL resampling filter (transformers stores PIL's enum values)."""
    return int(setting(settings, "resample", default))



@dataclass
class ImageInputs:
    """Processed images: the model's arrays and, per image, the text its placeholder becomes."""

    arrays: dict[str, np.ndarray]
    replacements: list[str]


class FamilyProcessor:
    """One family's image processing and image-placeholder expansion (subclassed per family).

    `placeholder` is the text the chat template writes for each image; `image_token_ids` are the
    ids marked 1 in the family's token-type output, if it has one.
    """

    family: str = ""
    placeholder: str = "<image>"
    token_type_key: str | None = None  # "mm_token_type_ids" / "token_type_ids" where HF returns it

    def process_images(self, images: list[Image.Image]) -> ImageInputs:
        """The arrays for RGB images, named as the HF processor names them."""
        raise NotImplementedError

    def image_token_ids(self) -> dict[int, int]:
        """Token id -> modality type (1 image, 2 video) for the token-type output."""
        return {}

    def text_outputs(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token arrays besides input_ids / attention_mask (token types where HF has them)."""
        if self.token_type_key is None:
            return {}
        types = np.zeros_like(input_ids)
        for token_id, kind in self.image_token_ids().items():
            types[input_ids == token_id] = kind
        return {self.token_type_key: types}
