"""Tests for edgevlm.calib: builtin generation, folder/jsonl loading, splits and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgevlm.calib import CalibSample, CalibSet, load_calibration
from edgevlm.errors import CalibrationError, UsageError


def _all(cs: CalibSet) -> list[CalibSample]:
    return cs.scoring + cs.heldout


def _save(path: Path, mode: str = "RGB", size=(24, 16), colour=(10, 120, 200)) -> Path:
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


# ---------------------------------------------------------------- builtin


def test_builtin_is_deterministic():
    a, b = load_calibration("builtin:10", seed=3), load_calibration("builtin:10", seed=3)
    assert a.description == b.description
    for x, y in zip(_all(a), _all(b), strict=True):
        assert (x.source, x.prompt, x.answer) == (y.source, y.prompt, y.answer)
        assert x.image.tobytes() == y.image.tobytes()


def test_builtin_default_count_and_variety():
    cs = load_calibration()
    samples = _all(cs)
    assert cs.description["n_total"] == len(samples) == 32
    assert all(s.image.mode == "RGB" for s in samples)
    assert len({s.image.size for s in samples}) > 10
    assert any(s.image.width != s.image.height for s in samples)
    assert all(64 <= d <= 384 for s in samples for d in s.image.size)
    assert len({s.prompt for s in samples}) >= 5
    assert all(s.answer for s in samples)
    assert sorted(s.source for s in samples) == sorted(f"builtin:{i}" for i in range(32))


def test_builtin_answers_match_content():
    by_src = {s.source: s for s in _all(load_calibration("builtin:20"))}
    for s in by_src.values():
        if s.prompt == "What colour is the background?":
            # The corner pixel is background for single-shape images.
            corner = s.image.getpixel((0, 0))
            expected = {"White.": (250, 250, 250), "Black.": (15, 15, 15), "Grey.": (128,) * 3}
            assert corner == expected[s.answer]
        if s.prompt in ("Read the text in the image.", "What word is written in the image?"):
            assert s.answer.isupper() and s.answer.isalpha()


def test_builtin_image_size_and_prefix():
    cs = load_calibration("builtin:6", image_size=96)
    assert {s.image.size for s in _all(cs)} == {(96, 96)}
    small = {s.source: s for s in _all(load_calibration("builtin:4"))}
    big = {s.source: s for s in _all(load_calibration("builtin:8"))}
    assert all(small[k].image.tobytes() == big[k].image.tobytes() for k in small)


def test_builtin_seed_changes_content():
    a, b = load_calibration("builtin:8", seed=0), load_calibration("builtin:8", seed=1)
    assert a.description["fingerprint"] != b.description["fingerprint"]


def test_no_torch_import():
    code = "import sys, edgevlm.calib; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


# ---------------------------------------------------------------- split


@pytest.mark.parametrize(
    "n, frac, held",
    [
        (1, 0.25, 0),
        (2, 0.25, 1),
        (2, 0.0, 1),
        (4, 0.25, 1),
        (10, 0.5, 5),
        (32, 0.25, 8),
        (3, 0.9, 2),
    ],
)
def test_split_sizes_and_disjoint(n, frac, held):
    cs = load_calibration(f"builtin:{n}", heldout_fraction=frac, image_size=32)
    d = cs.description
    assert (len(cs.heldout), len(cs.scoring)) == (held, n - held)
    assert (d["n_total"], d["n_scoring"], d["n_heldout"]) == (n, n - held, held)
    srcs = [s.source for s in _all(cs)]
    assert len(set(srcs)) == n
    assert not {s.source for s in cs.scoring} & {s.source for s in cs.heldout}


def test_split_depends_on_seed_and_description_is_json():
    a = load_calibration("builtin:12", seed=0)
    splits = {
        tuple(sorted(s.source for s in load_calibration("builtin:12", seed=k).heldout))
        for k in range(5)
    }
    assert len(splits) > 1
    d = json.loads(json.dumps(a.description))
    assert d["spec"] == "builtin:12" and d["kind"] == "builtin" and d["seed"] == 0
    assert len(d["fingerprint"]) == 64


# ---------------------------------------------------------------- folders and jsonl


def test_dir_without_prompts(tmp_path):
    for name in ("b.png", "a.jpg", "c.BMP", "d.gif", "e.webp"):
        _save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._a.jpg").write_bytes(b"macOS metadata, not an image")
    cs = load_calibration(str(tmp_path), heldout_fraction=0.4)
    samples = _all(cs)
    assert cs.description["kind"] == "dir"
    assert sorted(Path(s.source).name for s in samples) == [
        "a.jpg",
        "b.png",
        "c.BMP",
        "d.gif",
        "e.webp",
    ]
    assert all(s.prompt == "Describe this image." and s.answer is None for s in samples)
    assert all(s.image.mode == "RGB" and s.image.size == (24, 16) for s in samples)
    assert (len(cs.scoring), len(cs.heldout)) == (3, 2)


def test_dir_with_prompts(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _save(tmp_path / name)
    _write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"image": "a.png", "prompt": "What is it?", "answer": "A square."},
            "",
            {"image": "a.png", "prompt": "Colour?", "answer": None},
            {"image": "b.png", "prompt": "Describe."},
        ],
    )
    samples = {
        (Path(s.source).name, s.prompt, s.answer) for s in _all(load_calibration(str(tmp_path)))
    }
    assert samples == {
        ("a.png", "What is it?", "A square."),
        ("a.png", "Colour?", None),
        ("b.png", "Describe.", None),
        ("c.png", "Describe this image.", None),  # unmentioned images keep the default prompt
    }


def test_jsonl_relative_and_absolute_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    _save(tmp_path / "imgs" / "x.png")
    absolute = _save(tmp_path / "y.png", colour=(200, 0, 0))
    sub = tmp_path / "meta"
    sub.mkdir()
    _save(sub / "z.png")
    path = _write_jsonl(
        sub / "data.jsonl",
        [
            {"image": "../imgs/x.png", "prompt": "p1", "answer": "a1"},
            {"image": str(absolute), "prompt": "p2"},
            {"image": "z.png", "prompt": "p3", "answer": "a3"},
        ],
    )
    cs = load_calibration(str(path), seed=1)
    got = {(Path(s.source).name, s.prompt, s.answer) for s in _all(cs)}
    assert got == {("x.png", "p1", "a1"), ("y.png", "p2", None), ("z.png", "p3", "a3")}
    assert cs.description["kind"] == "jsonl"
    red = next(s for s in _all(cs) if s.prompt == "p2")
    assert red.image.getpixel((0, 0)) == (200, 0, 0)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "1", "I;16"])
def test_mode_conversion(tmp_path, mode):
    ext = "jpg" if mode == "CMYK" else "png"
    if mode == "I;16":  # a real 16-bit PNG uses the full 0..65535 range
        img = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    else:
        img = Image.new("RGB", (8, 8), (255, 255, 255)).convert(mode)
    img.save(tmp_path / f"x.{ext}")
    assert Image.open(tmp_path / f"x.{ext}").mode == mode
    (s,) = _all(load_calibration(str(tmp_path)))
    assert s.image.mode == "RGB" and s.image.size == (8, 8)
    assert all(abs(v - 255) <= 3 for v in s.image.getpixel((4, 4)))


def test_alpha_is_composited_over_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:, :2, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0])
    p.info["transparency"] = 0
    p.paste(1, (0, 0, 2, 4))
    p.save(tmp_path / "b.png", transparency=0)
    a, b = sorted(_all(load_calibration(str(tmp_path))), key=lambda s: s.source)
    assert a.image.getpixel((0, 0)) == (255, 0, 0) and a.image.getpixel((3, 0)) == (255, 255, 255)
    assert b.image.getpixel((0, 0)) == (0, 255, 0) and b.image.getpixel((3, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_content(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")

    def fp():
        return load_calibration(str(tmp_path)).description["fingerprint"]

    base = fp()
    assert fp() == base
    _save(tmp_path / "b.png", colour=(10, 120, 201))  # one pixel value changes
    changed_pixels = fp()
    assert changed_pixels != base
    _write_jsonl(tmp_path / "prompts.jsonl", [{"image": "a.png", "prompt": "Other prompt."}])
    changed_prompt = fp()
    assert changed_prompt not in (base, changed_pixels)
    _write_jsonl(
        tmp_path / "prompts.jsonl", [{"image": "a.png", "prompt": "Other prompt.", "answer": "x"}]
    )
    assert fp() not in (base, changed_pixels, changed_prompt)


# ---------------------------------------------------------------- errors


def _raises(spec: str, *names: str, **kw) -> CalibrationError:
    with pytest.raises(CalibrationError) as info:
        load_calibration(spec, **kw)
    err = info.value
    assert isinstance(err, UsageError) and err.fix
    for name in names:
        assert name in str(err), (name, str(err))
    return err


@pytest.mark.parametrize("spec", ["builtin:0", "builtin:x", "builtin:-3", "builtin:"])
def test_bad_builtin_count(spec):
    _raises(spec, spec)


@pytest.mark.parametrize("frac", [-0.1, 1.0, 1.5])
def test_bad_heldout_fraction(frac):
    _raises("builtin:4", "heldout_fraction", heldout_fraction=frac)


def test_missing_path(tmp_path):
    _raises(str(tmp_path / "nope"), "nope")


def test_path_object_accepted(tmp_path):
    _save(tmp_path / "a.png")
    assert load_calibration(tmp_path).description["spec"] == str(tmp_path)


def test_not_dir_or_jsonl(tmp_path):
    _raises(str(_save(tmp_path / "a.png")), "a.png")


def test_dir_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    _raises(str(tmp_path), str(tmp_path), "no images")


def test_empty_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    _raises(str(path), "empty.jsonl", "no samples")


@pytest.mark.parametrize(
    "line, what",
    [
        ("{not json", "invalid JSON"),
        ('["a.png", "p"]', "JSON object"),
        ('{"prompt": "p"}', "'image'"),
        ('{"image": "a.png"}', "'prompt'"),
        ('{"image": "a.png", "prompt": ""}', "'prompt'"),
        ('{"image": "a.png", "prompt": "p", "answer": 3}', "'answer'"),
        ('{"image": "missing.png", "prompt": "p"}', "missing.png"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, what):
    _save(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "data.jsonl", [{"image": "a.png", "prompt": "ok"}, line])
    _raises(str(path), "data.jsonl:2", what)


def test_corrupt_image_in_jsonl(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "bad.png", "prompt": "p"}])
    _raises(str(path), "d.jsonl:1", "bad.png")


def test_corrupt_and_truncated_images_in_dir(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    _raises(str(tmp_path), "bad.jpg")
    (tmp_path / "bad.jpg").unlink()
    good = _save(tmp_path / "trunc.png", size=(64, 64))
    good.write_bytes(good.read_bytes()[:60])
    _raises(str(tmp_path), "trunc.png")


def test_prompts_jsonl_naming_unknown_image(tmp_path):
    _save(tmp_path / "a.png")
    _write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"image": "a.png", "prompt": "p"}, {"image": "zz.png", "prompt": "p"}],
    )
    _raises(str(tmp_path), "prompts.jsonl:2", "zz.png")


def test_bad_prompts_jsonl_in_dir(tmp_path):
    _save(tmp_path / "a.png")
    _write_jsonl(tmp_path / "prompts.jsonl", ['{"image": "a.png"'])
    _raises(str(tmp_path), "prompts.jsonl:1", "invalid JSON")
