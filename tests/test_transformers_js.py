"""transformers.js runs every ONNX export (issue 12): its AutoProcessor and
AutoModelForImageTextToText load the export folder in Node, and greedy generation with an image
gives exactly the ids PyTorch gives (prompt ids included).

Needs node and tests/js/node_modules (`make install` runs npm). Without them the tests skip,
except under CI=true, where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILIES, load_tiny
from PIL import Image

pytestmark = pytest.mark.slow

JS = Path(__file__).parent / "js"
GEN_TOKENS = 12
PROMPT = "What is in this picture?"


def _node() -> str:
    node = shutil.which("node")
    if node and (JS / "node_modules/@huggingface/transformers/package.json").is_file():
        return node
    reason = "transformers.js is not installed: needs node and tests/js/node_modules (make install)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


JS_DTYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}


def transformers_js_generate(folder: Path, image: Path, prompt: str, max_new_tokens: int,
                             dump: Path) -> dict:
    """tests/js/generate.mjs: {"input_ids", "tokens", "arrays": its processor's outputs}."""
    dump.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([_node(), str(JS / "generate.mjs"), str(folder), str(image), prompt,
                             str(max_new_tokens), str(dump)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["arrays"] = {name: np.fromfile(dump / f"{name}.bin", dtype=JS_DTYPES[meta["type"]])
                     .reshape(meta["dims"]) for name, meta in out["arrays"].items()}
    return out


def torch_greedy(vlm, batch: dict, max_new_tokens: int) -> list[int]:
    """PyTorch's greedy ids for a processor batch (EOS ignored, as the JS side)."""
    import copy

    import torch

    gen = copy.deepcopy(vlm.model.generation_config)
    gen.update(eos_token_id=[], do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=None)
    if gen.pad_token_id is None:
        gen.pad_token_id = 0
    with torch.no_grad():
        out = vlm.model.generate(**batch, generation_config=gen)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_js_greedy_ids_equal_pytorch(family, tmp_path):
    """Prompt ids and image arrays' layout equal the Hugging Face processor's; generated ids
    equal PyTorch's on the same pixels (transformers.js resizes with sharp, PyTorch's processor
    with Pillow: resampled pixels differ slightly, so PyTorch gets transformers.js' pixels)."""
    import torch

    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.loader import materialize_tiny
    from edgevlm.prompting import chat_text

    _node()
    vlm = load_tiny(family)
    pixels = np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    image = Image.open(tmp_path / "image.png").convert("RGB")
    batch = dict(vlm.processor(text=[chat_text(vlm.processor, PROMPT)], images=[[image]],
                               return_tensors="pt"))
    export_onnx(materialize_tiny(f"tiny:{family}"), tmp_path / "out", verify=False, progress=False)
    got = transformers_js_generate(tmp_path / "out" / "onnx", tmp_path / "image.png", PROMPT,
                                   GEN_TOKENS, tmp_path / "dump")
    assert got["input_ids"] == batch["input_ids"][0].tolist()
    js_pixels = got["arrays"]["pixel_values"]
    assert js_pixels.shape == tuple(batch["pixel_values"].shape)
    for name in ("image_grid_thw", "pixel_attention_mask"):
        if name in batch:
            np.testing.assert_array_equal(got["arrays"][name], batch[name].numpy())
    batch["pixel_values"] = torch.from_numpy(js_pixels.copy())
    assert got["tokens"] == torch_greedy(vlm, batch, GEN_TOKENS)
