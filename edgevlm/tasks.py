"""The procedural visual-question task set: seeded pictures of shapes, digits and letters with
questions that have one short right answer, in disjoint train / val / test splits.

It is what the `trained:` reference models learn and what `eval` measures accuracy on
(`--calib tasks:200`, `tasks:200:test`). Torch-free (Pillow + numpy) like the rest of the
calibration code.

Tasks (each answer is one or a few words, lower case):
  colour    the colour of the only shape                    red, green, ... (6)
  shape     the name of the only shape                      circle, square, triangle, diamond
  count     how many shapes (1-6, one colour)               1 .. 6
  position  where shape A is relative to shape B            left, right, above, below
  bigger    which of two shapes (named by colour) is bigger a colour
  read      the 1-3 characters written in the image         e.g. "7", "ab", "k42"
  yesno     a yes/no form of colour, shape, count or position questions
  arith     text only: "what is 3 + 4?" (the picture is blank)   0 .. 18
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from edgevlm.calib import CalibSample, _font, _shape
from edgevlm.errors import CalibrationError

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "orange": (245, 130, 20), "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle", "diamond")
GLYPHS = "0123456789abcdefhkmnprstuxyz"
TASKS = ("colour", "shape", "count", "position", "bigger", "read", "yesno", "arith")
# Disjoint seed streams: an item is identified by (split, seed, index).
SPLITS = {"train": 0, "val": 1, "test": 2}
BACKGROUND = (245, 245, 240)
SIZE_RANGE = (64, 161)  # image sides in pixels; aspect varies, so tiling / resolution does too
CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "count": 1 / 6, "position": 1 / 4, "bigger": 1 / 2,
          "read": 1 / len(GLYPHS), "yesno": 1 / 2, "arith": 1 / 19}


def task_samples(n: int, split: str = "val", seed: int = 0, tasks=TASKS) -> list[CalibSample]:
    """`n` items of `split`, cycling through `tasks` so every task is equally represented.
    `task_samples(8)` is a prefix of `task_samples(200)` (one generator per item)."""
    if split not in SPLITS:
        raise CalibrationError(f"unknown task split '{split}'", f"use one of {', '.join(SPLITS)}")
    return [task_sample(i, split, seed, tasks[i % len(tasks)]) for i in range(n)]


def task_sample(index: int, split: str = "val", seed: int = 0, task: str | None = None) -> CalibSample:
    """One item; `task` defaults to the rotation used by `task_samples`."""
    task = task or TASKS[index % len(TASKS)]
    rng = np.random.default_rng([SPLITS[split], seed % 2**32, index])
    w, h = (int(v) for v in rng.integers(*SIZE_RANGE, 2))
    image = Image.new("RGB", (w, h), BACKGROUND)
    prompt, answer = _MAKERS[task](rng, ImageDraw.Draw(image), w, h)
    return CalibSample(image, prompt, answer, f"tasks:{split}:{index}", task=task)


def parse_spec(spec: str) -> tuple[int, str]:
    """'tasks' / 'tasks:N' / 'tasks:N:split' -> (N, split); default 200 items of 'val'."""
    parts = spec.split(":")[1:]
    count = parts[0] if parts else "200"
    split = parts[1] if len(parts) > 1 else "val"
    if len(parts) > 2 or not count.isdigit() or int(count) < 1 or split not in SPLITS:
        raise CalibrationError(f"bad task spec '{spec}'",
                               "use tasks, tasks:N or tasks:N:SPLIT with SPLIT train|val|test")
    return int(count), split


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _radius(rng, w, h, lo=0.22, hi=0.34) -> int:
    return max(6, int(min(w, h) * rng.uniform(lo, hi)))


def _one_shape(rng, draw, w, h):
    colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
    r = _radius(rng, w, h)
    cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
    _shape(draw, shape, cx, cy, r, COLOURS[colour])
    return colour, shape


def _colour(rng, draw, w, h):
    colour, _ = _one_shape(rng, draw, w, h)
    return "What colour is the shape?", colour


def _shape_name(rng, draw, w, h):
    _, shape = _one_shape(rng, draw, w, h)
    return "What shape is this?", shape


def _draw_count(rng, draw, w, h) -> int:
    """1-6 same-coloured shapes, one per cell of a 3x2 grid (never overlapping)."""
    n = int(rng.integers(1, 7))
    cols, rows = (3, 2) if w >= h else (2, 3)
    cw, ch = w / cols, h / rows
    r = max(4, int(min(cw, ch) * 0.3))
    colour = COLOURS[_pick(rng, list(COLOURS))]
    for cell in rng.permutation(cols * rows)[:n]:
        cx = int(cw * (cell % cols + 0.5) + rng.integers(-1, 2) * r * 0.3)
        cy = int(ch * (cell // cols + 0.5) + rng.integers(-1, 2) * r * 0.3)
        _shape(draw, _pick(rng, SHAPES), cx, cy, r, colour)
    return n


def _count(rng, draw, w, h):
    return "How many shapes are there?", str(_draw_count(rng, draw, w, h))


def _draw_pair(rng, draw, w, h):
    """Two shapes of different colours side by side or one above the other; returns
    (colour A, colour B, where A is relative to B)."""
    a, b = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
    relation = _pick(rng, ("left", "right", "above", "below"))
    horizontal = relation in ("left", "right")
    r = max(5, min(int((w if horizontal else h) / 4 * 0.7), int(min(w, h) * 0.3)))
    near, far = (w // 4, 3 * w // 4) if horizontal else (h // 4, 3 * h // 4)
    first, second = (near, far) if relation in ("left", "above") else (far, near)
    jitter = int(rng.integers(-r // 2, r // 2 + 1))
    for colour, pos in ((a, first), (b, second)):
        cx, cy = (pos, h // 2 + jitter) if horizontal else (w // 2 + jitter, pos)
        _shape(draw, _pick(rng, SHAPES), cx, cy, r, COLOURS[colour])
    return a, b, relation


def _position(rng, draw, w, h):
    a, b, relation = _draw_pair(rng, draw, w, h)
    return f"Where is the {a} shape compared to the {b} shape?", relation


def _bigger(rng, draw, w, h):
    a, b = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
    big = int(min(w, h) * rng.uniform(0.2, 0.26))
    small = max(4, int(big * rng.uniform(0.4, 0.6)))
    radii = (big, small) if rng.integers(2) else (small, big)
    left_first = bool(rng.integers(2))
    for k, (colour, r) in enumerate(zip((a, b), radii, strict=True)):
        cx = w // 4 if (k == 0) == left_first else 3 * w // 4
        _shape(draw, _pick(rng, SHAPES), cx, h // 2, r, COLOURS[colour])
    bigger = a if radii[0] > radii[1] else b
    first, second = (a, b) if rng.integers(2) else (b, a)
    return f"Which shape is bigger, the {first} one or the {second} one?", bigger


def _read(rng, draw, w, h):
    text = "".join(_pick(rng, GLYPHS) for _ in range(int(rng.integers(1, 4))))
    size = max(10, int(min(h * 0.6, w * 0.8 / (0.62 * len(text)))))
    draw.text((w / 2, h / 2), text, fill=(20, 20, 20), font=_font(size), anchor="mm")
    return "What is written in the image?", text


def _yesno(rng, draw, w, h):
    kind = _pick(rng, ("colour", "shape", "count", "position"))
    truth = bool(rng.integers(2))
    if kind == "colour":
        colour, _ = _one_shape(rng, draw, w, h)
        asked = colour if truth else _pick(rng, [c for c in COLOURS if c != colour])
        prompt = f"Is the shape {asked}?"
    elif kind == "shape":
        _, shape = _one_shape(rng, draw, w, h)
        asked = shape if truth else _pick(rng, [s for s in SHAPES if s != shape])
        prompt = f"Is this a {asked}?"
    elif kind == "count":
        n = _draw_count(rng, draw, w, h)
        asked = n if truth else _pick(rng, [k for k in range(1, 7) if k != n])
        prompt = f"Are there {asked} shapes?"
    else:
        a, b, relation = _draw_pair(rng, draw, w, h)
        asked = relation if truth else _pick(rng, [r for r in ("left", "right", "above", "below")
                                                    if r != relation])
        prompt = f"Is the {a} shape {asked} of the {b} shape?" if asked in ("left", "right") \
            else f"Is the {a} shape {asked} the {b} shape?"
    return prompt, "yes" if truth else "no"


def _arith(rng, draw, w, h):
    x, y = (int(v) for v in rng.integers(0, 10, 2))
    return f"What is {x} plus {y}?", str(x + y)


_MAKERS = {"colour": _colour, "shape": _shape_name, "count": _count, "position": _position,
           "bigger": _bigger, "read": _read, "yesno": _yesno, "arith": _arith}
