"""An image budget: at most N image tokens per image, through each family's own knob.

- SmolVLM / Idefics3: image_seq_len tokens per tile, a k x k grid of tiles plus the global
  image when the longest edge is k tiles. The budget picks the largest k whose worst case (a
  square picture) fits: size.longest_edge = k tiles, or image splitting off for one tile.
- Qwen2-VL / Qwen2.5-VL: one token per 2x2 merged 14 px patches, so max_pixels = N * 28^2
  (smart_resize keeps height x width <= max_pixels).
- Gemma 3: a fixed number of soft tokens per image; pan-and-scan (extra crops) off.
- LLaVA: a fixed number per image; nothing to shrink.
A budget below the family's minimum is refused with the minimum in the message.

Torch-free: the runners, `edgevlm inspect` and the exporters all use it, and token counts come
from the runners' own preprocessing (edgevlm.runtimes.preprocess).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from PIL import Image

from edgevlm.errors import UsageError

from .preprocess.common import CheckpointFiles
from .preprocess.pipeline import Preprocessor


def _family(files: CheckpointFiles) -> str:
    return Preprocessor(files).family


def budget_settings(files: CheckpointFiles, max_tokens: int) -> dict:
    """The image-processor settings that keep every image at or under `max_tokens` tokens."""
    if max_tokens < 1:
        raise UsageError(f"--max-image-tokens {max_tokens} must be at least 1",
                         "e.g. --max-image-tokens 256")
    image = copy.deepcopy(files.image)
    family = _family(files)
    if family == "smolvlm":
        per_tile = int(files.processor.get("image_seq_len", image.get("image_seq_len", 169)))
        tile = int((image.get("max_image_size") or {"longest_edge": 364})["longest_edge"])
        _at_least(max_tokens, per_tile, "one tile")
        k = 1
        while ((k + 1) ** 2 + 1) * per_tile <= max_tokens:
            k += 1
        if k == 1:
            image["do_image_splitting"] = False
        else:
            longest = int((image.get("size") or {}).get("longest_edge", k * tile))
            image["size"] = {"longest_edge": min(longest, k * tile)}
    elif family in ("qwen2-vl", "qwen2.5-vl"):
        from .preprocess.qwen2_vl import pixel_bounds

        factor = int(image.get("patch_size", 14)) * int(image.get("merge_size", 2))
        min_pixels, current = pixel_bounds(image)
        max_pixels = min(current, max_tokens * factor * factor)  # a budget never raises it
        _at_least(max_tokens, -(-min_pixels // (factor * factor)), "min_pixels")
        image["max_pixels"] = max_pixels
        image["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    else:
        image["do_pan_and_scan"] = False if family == "gemma3" else image.get("do_pan_and_scan")
        if image["do_pan_and_scan"] is None:
            del image["do_pan_and_scan"]
        fixed = image_cost(files, 640, 480)["image_tokens"]
        _at_least(max_tokens, fixed, f"every {family} image")
    return image


def _at_least(budget: int, minimum: int, what: str) -> None:
    if budget < minimum:
        raise UsageError(f"--max-image-tokens {budget} is below the {minimum} tokens of {what}",
                         f"use --max-image-tokens {minimum} or more")


def budgeted_files(files: CheckpointFiles, max_tokens: int | None) -> CheckpointFiles:
    if max_tokens is None:
        return files
    out = copy.copy(files)
    out.image = budget_settings(files, max_tokens)
    return out


def preprocessor(folder, max_image_tokens: int | None = None) -> Preprocessor:
    """The runners' preprocessing of `folder`, under an image budget when one is given."""
    return Preprocessor(budgeted_files(CheckpointFiles.read(folder), max_image_tokens))


def image_cost(files_or_folder, width: int, height: int,
               max_image_tokens: int | None = None) -> dict:
    """Image tokens and vision-encoder images (tiles, crops) one width x height picture costs."""
    files = (files_or_folder if isinstance(files_or_folder, CheckpointFiles)
             else CheckpointFiles.read(files_or_folder))
    pre = Preprocessor(budgeted_files(files, max_image_tokens))
    processed = pre.images.process_images([Image.new("RGB", (width, height), (127, 127, 127))])
    token = getattr(pre.images, "image_token", None) or pre.images.placeholder
    pixels = processed.arrays["pixel_values"]
    if "image_grid_thw" in processed.arrays:  # Qwen: one row per patch, no tiles
        tiles = len(processed.arrays["image_grid_thw"])
    else:
        tiles = pixels.shape[1] if pixels.ndim == 5 else pixels.shape[0]
    return {"image_tokens": processed.replacements[0].count(token), "tiles": int(tiles),
            "pixel_values_shape": list(pixels.shape)}


def write_budget(folder: str | Path, max_tokens: int) -> dict:
    """Write the budget into an export's processor config (processor_config.json's
    image_processor, or preprocessor_config.json), where transformers and the runners read it."""
    folder = Path(folder)
    settings = budget_settings(CheckpointFiles.read(folder), max_tokens)
    nested = folder / "processor_config.json"
    if nested.is_file() and "image_processor" in json.loads(nested.read_text()):
        data = json.loads(nested.read_text())
        data["image_processor"] = settings
        nested.write_text(json.dumps(data, indent=2) + "\n")
    flat = folder / "preprocessor_config.json"
    if flat.is_file():
        data = json.loads(flat.read_text())
        data.update(settings)
        flat.write_text(json.dumps(data, indent=2) + "\n")
    return settings


# ------------------------------------------------------------------ the product's entry points


def check_value(max_tokens: int | None) -> None:
    """Refuse a budget that no family can meet (0, negative) before anything loads."""
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-image-tokens {max_tokens} must be at least 1",
                         "give a positive token count, e.g. --max-image-tokens 256")


def parse_image_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) or not int(height):
        raise UsageError(f"--image-size '{text}' is not WIDTHxHEIGHT", "e.g. --image-size 640x480")
    return int(width), int(height)


def export_budget(artifact) -> int | None:
    """The budget an export was made with (manifest extra.image_budget), None if none."""
    return ((artifact.extra or {}).get("image_budget") or {}).get("max_image_tokens")


def record_in_export(out: str | Path, artifact, max_tokens: int) -> dict:
    """`edgevlm export --max-image-tokens N`: write the budget into an ONNX export's processor
    config (transformers.js, transformers and the onnxruntime runner read it there), record it
    in the manifest (the llama.cpp runner reads it there: a GGUF has no processor config) and
    re-save out/manifest.json."""
    out = Path(out)
    record: dict = {"max_image_tokens": int(max_tokens)}
    if artifact.target == "onnx":
        record["processor_settings"] = write_budget(out / "onnx", max_tokens)
        record["written_to"] = [p for p in ("onnx/processor_config.json",
                                            "onnx/preprocessor_config.json")
                                if (out / p).is_file()]
        from .provenance import sha256_file

        for entry in artifact.files:  # the manifest's hashes follow the rewritten files
            if entry.path in record["written_to"]:
                entry.sha256 = sha256_file(out / entry.path)
                entry.bytes = (out / entry.path).stat().st_size
    else:
        record["llama_cpp_image_max_tokens"] = llamacpp_image_max_tokens(artifact, max_tokens)
    artifact.extra = dict(artifact.extra or {}, image_budget=record)
    artifact.save(out / "manifest.json")
    return record


def llamacpp_image_max_tokens(artifact, max_tokens: int | None) -> int:
    """mtmd's `image_max_tokens` (0 = the model's default) for a budget of `max_tokens` image
    tokens on a GGUF export.

    mtmd turns image_max_tokens into a pixel cap (tokens x patch area) on the image it tiles:
    - Qwen2-VL / 2.5-VL: the same max_pixels = N * 28^2 as the Hugging Face processor, so the
      count matches the onnxruntime runner's;
    - SmolVLM: the cap covers the tile grid only, and mtmd always keeps at least one tile plus
      the global image (it has no "splitting off"): the grid gets N - one tile, and a budget
      under two tiles is refused;
    - Gemma 3 / LLaVA: a fixed count per image (mtmd does no pan-and-scan); nothing to set,
      the runner checks the count against the budget.
    """
    if max_tokens is None:
        return 0
    check_value(max_tokens)
    family = artifact.io.family
    if family == "smolvlm":
        per_tile = int((artifact.io.gguf.get("image") or {}).get("image_tokens_per_tile") or 0)
        if per_tile:
            if max_tokens < 2 * per_tile:
                raise UsageError(
                    f"--max-image-tokens {max_tokens} is below the {2 * per_tile} tokens of one "
                    f"tile plus the global image, llama.cpp's smallest SmolVLM image",
                    f"use --max-image-tokens {2 * per_tile} or more (or the onnx target, "
                    f"whose one-tile minimum is {per_tile})")
            return max_tokens - per_tile
        return max_tokens
    if family in ("qwen2-vl", "qwen2.5-vl"):
        if max_tokens < LLAMACPP_QWEN_MIN_TOKENS:
            raise UsageError(
                f"--max-image-tokens {max_tokens} is below llama.cpp's Qwen-VL minimum of "
                f"{LLAMACPP_QWEN_MIN_TOKENS} image tokens",
                f"use --max-image-tokens {LLAMACPP_QWEN_MIN_TOKENS} or more")
        return max_tokens
    return 0


# mtmd's smallest Qwen-VL image: image_min_pixels 6272 = 8 x 28^2 (it refuses a lower max).
LLAMACPP_QWEN_MIN_TOKENS = 8


def check_llamacpp_count(family: str, image_tokens: int, max_tokens: int | None) -> None:
    """After mtmd tokenized the prompt: refuse an image that costs more than the budget."""
    if max_tokens is not None and image_tokens > max_tokens:
        raise UsageError(
            f"--max-image-tokens {max_tokens} is below the {image_tokens} tokens llama.cpp "
            f"gives this image ({family})",
            f"use --max-image-tokens {image_tokens} or more")
