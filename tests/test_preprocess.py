"""The runners' torch-free preprocessing against the HF processors of the same folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILIES
from PIL import Image

from edgevlm.errors import UnsupportedModelError, UsageError
from edgevlm.runtimes.preprocess import load_preprocessor

PROMPT = "What is in the image?"


def _random(height, width, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _gradient(height, width):
    ramp = np.linspace(0, 255, height * width * 3).reshape(height, width, 3)
    return Image.fromarray(ramp.astype(np.uint8))


# Sizes and aspect ratios that exercise every resize path (up- and down-scaling, tiling, crop).
IMAGES = {
    "500x300": lambda: _random(300, 500, seed=1),
    "40x30": lambda: _random(30, 40, seed=2),
    "90x333-tall": lambda: _random(333, 90, seed=3),
    "77x51-gray": lambda: _random(51, 77, "L", seed=4),
    "64x64-rgba": lambda: _random(64, 64, "RGBA", seed=5),
    "200x120-gradient": lambda: _gradient(120, 200),
}

_FOLDERS: dict = {}
_HF: dict = {}


def folder_of(name: str) -> Path:
    if name not in _FOLDERS:
        from edgevlm.loader import materialize_tiny

        _FOLDERS[name] = materialize_tiny(f"tiny:{name}")
    return _FOLDERS[name]


def hf_processor(folder: Path):
    if folder not in _HF:
        import transformers

        from edgevlm.adapters import adapter_for_config
        from edgevlm.processors import load_processor

        config = transformers.AutoConfig.from_pretrained(folder)
        _HF[folder] = load_processor(folder, adapter_for_config(config))
    return _HF[folder]


def hf_inputs(folder: Path, image, prompt: str = PROMPT, **kwargs) -> dict:
    from edgevlm.prompting import chat_batch, chat_text

    processor = hf_processor(folder)
    out = chat_batch(processor, [chat_text(processor, prompt)], [[image]], return_tensors="np",
                     **kwargs)
    return {k: np.asarray(v) for k, v in out.items()}


def assert_same(mine: dict, reference: dict):
    """Same keys, shapes, dtypes; ids, grids and masks exact; pixels exact (atol 1e-5 at most)."""
    assert set(mine) == set(reference)
    for key, ref in reference.items():
        got = mine[key]
        assert got.shape == ref.shape and got.dtype == ref.dtype, (key, got.shape, ref.shape)
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=key)
            assert np.array_equal(got, ref), f"{key}: close but not bit-identical"
        else:
            assert np.array_equal(got, ref), key


def edited_copy(name: str, tmp_path: Path, image=None, processor=None, tokenizer=None) -> Path:
    """A copy of a tiny folder (without weights) with edited processor / tokenizer settings."""
    dest = tmp_path / name
    shutil.copytree(folder_of(name), dest, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((dest / "processor_config.json").read_text())
    config["image_processor"].update(image or {})
    config.update(processor or {})
    (dest / "processor_config.json").write_text(json.dumps(config))
    if tokenizer:
        tok = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps({**tok, **tokenizer}))
    return dest


def test_matches_hf_processor(family):
    folder = folder_of(family)
    pre = load_preprocessor(folder)
    assert pre.family == family
    for name, make in IMAGES.items():
        image = make()
        mine = pre(image, PROMPT)
        assert_same(mine, hf_inputs(folder, image))
        assert mine["input_ids"].shape[0] == 1, name


def test_k256_variant_folders(family):
    folder = folder_of(f"{family}-k256")
    image = IMAGES["500x300"]()
    assert_same(load_preprocessor(folder)(image, PROMPT), hf_inputs(folder, image))


def test_chat_ids_have_one_bos_as_apply_chat_template(family):
    """Rendered chats are tokenized as the processor's apply_chat_template(tokenize=True):
    where the template writes BOS (LLaVA, Gemma 3) no second one is added, on the torch side
    (edgevlm.prompting) and in the runtime preprocessing alike."""
    from edgevlm.prompting import chat_batch, chat_text

    folder = folder_of(family)
    processor, image = hf_processor(folder), IMAGES["40x30"]()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    hf = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, images=[image])["input_ids"]
    ours = chat_batch(processor, [chat_text(processor, PROMPT)], [[image]])["input_ids"]
    runtime = load_preprocessor(folder)(image, PROMPT)["input_ids"]
    assert list(ours[0]) == list(hf[0]) == runtime[0].tolist()
    bos = processor.tokenizer.bos_token_id
    assert bos is None or list(ours[0][:2]) != [bos, bos]


def test_chat_text_matches_processor_template(family):
    from edgevlm.prompting import chat_text

    folder = folder_of(family)
    assert load_preprocessor(folder).chat_text(PROMPT) == chat_text(hf_processor(folder), PROMPT)


def test_several_images_and_text_only(family):
    from edgevlm.prompting import chat_batch

    folder = folder_of(family)
    processor, pre = hf_processor(folder), load_preprocessor(folder)
    prompt = "Compare them: ünïcödé 😀 <b>&"
    first, second = IMAGES["500x300"](), IMAGES["40x30"]()
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    reference = chat_batch(processor, [text], [[first, second]], return_tensors="np")
    assert_same(pre([first, second], prompt), {k: np.asarray(v) for k, v in reference.items()})

    content = [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    reference = chat_batch(processor, [text], None, return_tensors="np")
    assert_same(pre(None, prompt), {k: np.asarray(v) for k, v in reference.items()})


def test_image_paths_load_like_transformers(tmp_path):
    folder = folder_of("qwen2-vl")
    rgba = tmp_path / "rgba.png"
    _random(37, 90, "RGBA", seed=6).save(rgba)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    _gradient(60, 100).save(rotated, exif=exif)
    pre = load_preprocessor(folder)
    for path in (rgba, rotated):
        assert_same(pre(path, PROMPT), hf_inputs(folder, str(path)))
    assert pre(rotated, PROMPT)["image_grid_thw"].tolist() == [[1, 8, 4]]  # portrait after EXIF


# Settings the tiny folders do not use but real checkpoints do.
VARIANTS = {
    "smolvlm-single-tile": ("smolvlm", {"size": {"longest_edge": 32}}, {}, {}),
    "smolvlm-no-split": ("smolvlm", {"do_image_splitting": False}, {}, {}),
    "smolvlm-3x3-tiles": ("smolvlm", {"size": {"longest_edge": 96}}, {}, {}),
    "qwen-old-pixel-keys": ("qwen2-vl", {"size": {"min_pixels": 3136, "max_pixels": 12845056},
                                         "min_pixels": 3136, "max_pixels": 12845056}, {}, {}),
    "qwen-small-max-pixels": ("qwen2.5-vl", {"min_pixels": 12544, "max_pixels": 15680}, {}, {}),
    "llava-fixed-size-no-crop": ("llava", {"size": {"height": 48, "width": 40},
                                           "do_center_crop": False}, {}, {}),
    "llava-pad-to-square": ("llava", {"image_processor_type": "LlavaImageProcessor",
                                      "do_pad": True}, {}, {}),
    "llava-int-sizes-full-strategy": ("llava", {"size": 40, "crop_size": 32},
                                      {"vision_feature_select_strategy": "full"}, {}),
    # transformers ignores add_bos_token when tokenizer.json exists; so must we.
    "llava-add-bos-token-ignored": ("llava", {}, {}, {"add_bos_token": True}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_setting_variants(variant, tmp_path):
    name, image_settings, processor_settings, tokenizer_settings = VARIANTS[variant]
    folder = edited_copy(name, tmp_path, image_settings, processor_settings, tokenizer_settings)
    pre = load_preprocessor(folder)
    for key in ("500x300", "40x30", "90x333-tall"):
        image = IMAGES[key]()
        assert_same(pre(image, PROMPT), hf_inputs(folder, image))


def test_smolvlm_single_tile_layout(tmp_path):
    folder = edited_copy("smolvlm", tmp_path, {"size": {"longest_edge": 32}})
    pre = load_preprocessor(folder)
    expanded = pre.expand(pre.chat_text(PROMPT), pre.process_images([IMAGES["500x300"]()]).replacements)
    assert "<fake_token_around_image><global-img>" + "<image>" * 4 + "<fake_token_around_image>" in expanded
    assert "<row_1_col_1>" not in expanded


def test_idefics3_folder(tmp_path):
    """model_type idefics3: Idefics3Processor's own tokens and the same image processor."""
    import transformers

    folder = edited_copy("smolvlm", tmp_path, {"image_processor_type": "Idefics3ImageProcessor"},
                         {"processor_class": "Idefics3Processor"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "idefics3"}))
    processor = transformers.Idefics3Processor.from_pretrained(str(folder))
    pre = load_preprocessor(folder)
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    assert pre.chat_text(PROMPT) == text
    for key in ("500x300", "40x30"):
        image = IMAGES[key]()
        reference = processor(text=[text], images=[[image]], return_tensors="np")
        assert_same(pre(image, PROMPT), {k: np.asarray(v) for k, v in reference.items()})


def test_gemma3_pan_and_scan_on_request():
    folder = folder_of("gemma3")
    pre = load_preprocessor(folder)
    pre.images.do_pan_and_scan = True
    pre.images.pan_and_scan_min_crop_size = 16
    image = IMAGES["90x333-tall"]()
    mine = pre(image, PROMPT)
    assert_same(mine, hf_inputs(folder, image, do_pan_and_scan=True, pan_and_scan_min_crop_size=16))
    assert mine["pixel_values"].shape[0] > 1


def test_decode_stream_and_eos(family):
    folder = folder_of(family)
    pre, tokenizer = load_preprocessor(folder), hf_processor(folder).tokenizer
    ids = pre(None, "Streaming ünïcödé 😀 text, with spaces  and\nnewlines.")["input_ids"][0]
    assert pre.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert pre.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids)
    stream = pre.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == pre.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)
    # Tokens that decode to nothing (skipped specials) keep the decoded window bounded.
    stream = pre.stream()
    silent = [stream.push(pre.eos_token_ids[0]) for _ in range(50)]
    assert silent == [""] * 50 and len(stream.ids) - stream._prefix <= 2
    assert stream.push(ids[-1]) == pre.decode(ids[-1:])
    generation = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    expected = {tokenizer.eos_token_id, *(generation if isinstance(generation, list) else [generation])}
    assert set(pre.eos_token_ids) == expected
    config = json.loads((folder / "config.json").read_text())
    assert pre.image_token_id == config.get("image_token_id", config.get("image_token_index"))


def test_bad_inputs(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        load_preprocessor(tmp_path)
    folder = edited_copy("llava", tmp_path)
    pre = load_preprocessor(folder)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(UsageError, match="cannot read image"):
        pre(broken, PROMPT)
    with pytest.raises(UsageError, match="cannot read image"):
        pre(tmp_path / "missing.png", PROMPT)
    with pytest.raises(UsageError, match="placeholders"):
        pre.expand("no placeholder here", ["<image>"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mllama"}))
    with pytest.raises(UnsupportedModelError, match="mllama"):
        load_preprocessor(folder)


def test_imports_without_torch_or_transformers():
    folders = {family: str(folder_of(family)) for family in FAMILIES}
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        before = set(sys.modules)
        import numpy as np
        from PIL import Image
        from edgevlm.runtimes.preprocess import load_preprocessor
        image = Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8))
        for family, folder in {folders!r}.items():
            pre = load_preprocessor(folder)
            inputs = pre(image, "hi")
            assert inputs["input_ids"].dtype == np.int64, family
            pre.decode(inputs["input_ids"][0])
        new = {{m.split(".")[0] for m in set(sys.modules) - before}}
        allowed = {{"edgevlm", "numpy", "PIL", "tokenizers", "jinja2", "markupsafe"}}
        foreign = sorted(new - set(sys.stdlib_module_names) - allowed)
        assert not foreign, foreign
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
