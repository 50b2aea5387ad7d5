"""Calibration data for layer scoring: image + prompt (+ short answer) samples.

Deliberately free of torch and transformers (PIL + numpy + stdlib) so calibration sets can be
built, inspected and fingerprinted anywhere.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, UnidentifiedImageError

from .errors import CalibrationError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
DEFAULT_PROMPT = "Describe this image."
PROMPTS_FILE = "prompts.jsonl"


@dataclass
class CalibSample:
    """One calibration example; ``image`` is always RGB."""

    image: Image.Image
    prompt: str
    answer: str | None  # short reference answer (for perplexity scoring), may be None
    source: str  # file path, "builtin:<i>" or "tasks:<split>:<i>"
    task: str | None = None  # the task-set task this item tests (edgevlm.tasks), if any


@dataclass
class CalibSet:
    """Samples split into a scoring part and a held-out part, plus a JSON-able description."""

    scoring: list[CalibSample]
    heldout: list[CalibSample]
    description: dict


def load_calibration(
    spec: str = "builtin",
    *,
    seed: int = 0,
    heldout_fraction: float = 0.25,
    image_size: int | None = None,
) -> CalibSet:
    """Load calibration samples from ``spec`` and split them with ``seed``.

    ``spec`` is ``builtin`` / ``builtin:N`` (N procedurally generated images, default 32),
    ``tasks`` / ``tasks:N`` / ``tasks:N:SPLIT`` (the task set of `edgevlm.tasks`), a
    directory of images (optionally with a ``prompts.jsonl``), or a ``.jsonl`` file of
    ``{"image", "prompt", "answer"}`` lines. ``image_size`` makes builtin images square of that
    size; files are used as they are. ``description["fingerprint"]`` is a sha256 over the
    decoded pixels, prompts, answers and the split, so cached scores can be keyed on it.
    Raises CalibrationError for anything unreadable or empty.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise CalibrationError(
            f"heldout_fraction must be in [0, 1), got {heldout_fraction}",
            "pass a fraction such as 0.25",
        )
    spec = str(spec)  # tolerate a Path
    if spec == "builtin" or spec.startswith("builtin:"):
        kind, samples = "builtin", _builtin(spec, seed, image_size)
    elif spec == "tasks" or spec.startswith("tasks:"):
        from edgevlm.tasks import parse_spec, task_samples

        kind, samples = "tasks", task_samples(*parse_spec(spec), seed=seed)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise CalibrationError(
                f"calibration data '{spec}' does not exist",
                "pass 'builtin:N', 'tasks:N', a folder of images or a .jsonl file",
            )
        if path.is_dir():
            kind, samples = "dir", _from_dir(path)
        elif path.suffix.lower() == ".jsonl":
            kind, samples = "jsonl", _from_jsonl(path)
        else:
            raise CalibrationError(
                f"calibration data '{spec}' is neither a folder nor a .jsonl file",
                "put the images in a folder, or list them in a .jsonl file",
            )

    n = len(samples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    # Scoring needs at least one sample and a held-out check is meaningless without one,
    # so clamp to [1, n-1] whenever there are two or more.
    n_held = min(max(round(n * heldout_fraction), 1), n - 1) if n > 1 else 0
    heldout = [samples[i] for i in order[:n_held]]
    scoring = [samples[i] for i in order[n_held:]]
    description = {
        "spec": spec,
        "kind": kind,
        "n_total": n,
        "n_scoring": len(scoring),
        "n_heldout": len(heldout),
        "seed": seed,
        "fingerprint": _fingerprint(scoring, heldout),
    }
    return CalibSet(scoring=scoring, heldout=heldout, description=description)


def hash_samples(samples, digest=None):
    """Feed samples (sizes, pixels, prompts, answers, in order) into a sha256; returns it.

    Every field is length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
    """
    digest = digest or hashlib.sha256()

    def put(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for s in samples:
        put(f"{s.image.width}x{s.image.height}".encode())
        put(s.image.tobytes())
        put(s.prompt.encode())
        put(b"\0" if s.answer is None else b"A" + s.answer.encode())
    return digest


def _fingerprint(scoring: list[CalibSample], heldout: list[CalibSample]) -> str:
    h = hashlib.sha256()
    for part, samples in ((b"scoring", scoring), (b"heldout", heldout)):
        h.update(len(part).to_bytes(8, "little") + part)
        hash_samples(samples, h)
    return h.hexdigest()


# ---------------------------------------------------------------- files


def open_rgb(path: Path, where: str | None = None) -> Image.Image:
    """Open an image fully (not lazily) and flatten it to RGB, compositing alpha over white."""
    at = f"{where}: " if where else ""
    if not path.is_file():
        raise CalibrationError(f"{at}image file '{path}' not found", "fix the path or add the file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):  # convert("RGB") would clip 16-bit grey to white
                return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8)).convert("RGB")
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return im.convert("RGB")  # also copies, so the file can be closed
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CalibrationError(
            f"{at}cannot read image '{path}': {exc}", "replace or remove the corrupt file"
        ) from exc


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Return (line number, record) pairs, validating the keys every record needs."""
    example = 'write lines like {"image": "a.jpg", "prompt": "...", "answer": "..."}'
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read '{path}': {exc}", "check the file") from exc
    records = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{no}: invalid JSON ({exc.msg})", example) from exc
        if not isinstance(rec, dict):
            raise CalibrationError(f"{path}:{no}: expected a JSON object", example)
        for key in ("image", "prompt"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise CalibrationError(f"{path}:{no}: missing or empty '{key}'", example)
        if not isinstance(rec.get("answer"), (str, type(None))):
            raise CalibrationError(f"{path}:{no}: 'answer' must be a string or null", example)
        records.append((no, rec))
    if not records:
        raise CalibrationError(f"'{path}' contains no samples", example)
    return records


def _from_jsonl(path: Path) -> list[CalibSample]:
    samples = []
    for no, rec in _read_jsonl(path):
        img = path.parent / rec["image"]  # an absolute "image" replaces the folder
        samples.append(
            CalibSample(open_rgb(img, f"{path}:{no}"), rec["prompt"], rec.get("answer"), str(img))
        )
    return samples


def _from_dir(folder: Path) -> list[CalibSample]:
    # Hidden files are skipped: macOS leaves "._name.jpg" metadata files that are not images.
    images = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
    )
    if not images:
        raise CalibrationError(
            f"folder '{folder}' contains no images", f"add {', '.join(IMAGE_EXTS)} files"
        )
    prompts_path = folder / PROMPTS_FILE
    by_name: dict[str, list[tuple[str | None, dict]]] = {p.name: [] for p in images}
    if prompts_path.is_file():
        for no, rec in _read_jsonl(prompts_path):
            if rec["image"] not in by_name:
                raise CalibrationError(
                    f"{prompts_path}:{no}: image '{rec['image']}' not found in '{folder}'",
                    "name an image file in that folder (file name only)",
                )
            by_name[rec["image"]].append((f"{prompts_path}:{no}", rec))
    samples = []
    for p in images:
        # An image may have several prompts; images prompts.jsonl does not mention still count.
        recs = by_name[p.name] or [(None, {"prompt": DEFAULT_PROMPT})]
        img = open_rgb(p, recs[0][0])
        samples += [CalibSample(img, r["prompt"], r.get("answer"), str(p)) for _, r in recs]
    return samples


# ---------------------------------------------------------------- builtin

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
}
_BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
_SHAPES = ("circle", "square", "triangle", "diamond")
_WORDS = ("CAT", "EDGE", "HELLO", "MODEL", "RIVER", "PIXEL", "STOP", "LAMP", "TREE", "BOOK")
_NUMBERS = ("One", "Two", "Three", "Four")


def _builtin(spec: str, seed: int, image_size: int | None) -> list[CalibSample]:
    _, colon, count = spec.partition(":")
    count = count if colon else "32"
    if not count.isdigit() or int(count) < 1:
        raise CalibrationError(
            f"bad calibration spec '{spec}': count must be a positive integer",
            "use 'builtin' or e.g. 'builtin:32'",
        )
    if image_size is not None and image_size < 32:
        raise CalibrationError(
            f"image_size must be at least 32, got {image_size}", "pass a larger image_size or none"
        )
    return [_make_builtin(i, seed, image_size) for i in range(int(count))]


def _make_builtin(i: int, seed: int, image_size: int | None) -> CalibSample:
    # One generator per index: builtin:8 is a prefix of builtin:32 with the same seed.
    rng = np.random.default_rng([seed % 2**32, i])
    w, h = (image_size, image_size) if image_size else (int(v) for v in rng.integers(64, 385, 2))

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    colour = pick(list(_COLOURS))
    article = "An" if colour[0] in "aeiou" else "A"
    bg = pick(list(_BACKGROUNDS))
    img = Image.new("RGB", (w, h), _BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    kind = i % 5  # fixed rotation so even a small builtin:N covers every kind

    if kind == 0:  # one shape
        shape = pick(_SHAPES)
        r = int(min(w, h) * rng.uniform(0.25, 0.4))
        cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
        _shape(draw, shape, cx, cy, r, _COLOURS[colour])
        qa = [
            ("What shape is in the image?", f"{article} {colour} {shape}."),
            ("What colour is the shape?", f"{colour.capitalize()}."),
            ("What colour is the background?", f"{bg.capitalize()}."),
        ]
    elif kind == 1:  # rendered text
        word = pick(_WORDS)
        size = max(8, min(h // 2, int(w * 0.9 / (0.65 * len(word)))))
        font = _font(size)
        while size > 8 and draw.textlength(word, font=font) > w * 0.9:
            size -= 2
            font = _font(size)
        draw.text((w / 2, h / 2), word, fill=_COLOURS[colour], font=font, anchor="mm")
        qa = [
            ("Read the text in the image.", word),
            ("What word is written in the image?", word),
            ("What colour is the text?", f"{colour.capitalize()}."),
        ]
    elif kind == 2:  # horizontal gradient between two colours
        other = pick([c for c in _COLOURS if c != colour])
        t = np.linspace(0.0, 1.0, w)[None, :, None]
        a, b = np.array(_COLOURS[colour]), np.array(_COLOURS[other])
        img = Image.fromarray(np.broadcast_to((a * (1 - t) + b * t), (h, w, 3)).astype(np.uint8))
        qa = [
            (
                "Describe the image.",
                f"A gradient from {colour} on the left to {other} on the right.",
            ),
            ("What colour is the left side of the image?", f"{colour.capitalize()}."),
        ]
    elif kind == 3:  # photo-like texture: upsampled, blurred noise tinted with one colour
        small = rng.random((max(2, h // 24), max(2, w // 24)))
        noise = Image.fromarray((small * 255).astype(np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC
        )
        noise = np.asarray(noise.filter(ImageFilter.GaussianBlur(3)), dtype=np.float64) / 255
        tint = np.array(_COLOURS[colour]) * (0.55 + 0.45 * noise[..., None])
        img = Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8))
        qa = [
            ("Describe the image.", f"A blurry {colour} texture."),
            ("What is the main colour of the image?", f"{colour.capitalize()}."),
        ]
    else:  # several circles, each in its own quadrant so they never overlap
        n = int(rng.integers(1, 5))
        r = max(4, int(min(w, h) * 0.18))
        for q in rng.permutation(4)[:n]:
            cx, cy = (w // 4) * (1 + 2 * (q % 2)), (h // 4) * (1 + 2 * (q // 2))
            _shape(draw, "circle", cx, cy, r, _COLOURS[colour])
        qa = [(f"How many {colour} circles are in the image?", f"{_NUMBERS[n - 1]}.")]
    prompt, answer = pick(qa)
    return CalibSample(img, prompt, answer, f"builtin:{i}")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = int(r * 0.85)
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
