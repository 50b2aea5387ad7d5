"""Issue 11, item 3 on the command line: --max-image-tokens on run / bench (both runners) and
export, `inspect --image-size`, and bad budgets (exit 2, one line, a fix)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from edgevlm.cli import main
from edgevlm.devices import get_profile
from edgevlm.runtimes.bench import bench_image, make_runner
from edgevlm.runtimes.image_budget import image_cost, preprocessor, record_in_export

LAPTOP = get_profile("laptop-x86")
PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(target, family) -> a tiny export (not verified here: test_*_export do that)."""
    from edgevlm.export.gguf_export import export_gguf
    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.loader import materialize_tiny

    done = {}

    def get(target, family="smolvlm"):
        if (target, family) not in done:
            root = tmp_path_factory.mktemp(f"{target}-{family}")
            export = export_gguf if target == "gguf" else export_onnx
            artifact = export(materialize_tiny(f"tiny:{family}"), root, verify=False,
                              progress=False)
            artifact.save(root / "manifest.json")
            done[target, family] = root
        return done[target, family]

    return get


def _run(export, capsys, *budget) -> int:
    """`edgevlm run` on the 640x480 test picture; the prompt tokens the runner reports."""
    assert main(["run", str(export), "--image", "builtin", "--prompt", PROMPT, "--max-tokens",
                 "1", "--device", "laptop-x86", *budget]) == 0
    err = capsys.readouterr().err
    return int(re.search(r"(\d+) prompt tokens", err).group(1))


def _gguf_image_tokens(export, budget) -> int:
    """Image tokens mtmd makes of the 640x480 picture under the budget (llama.cpp's own
    preprocessing, read from its chunks)."""
    from llama_cpp import mtmd_cpp as mtmd

    runner, _, _ = make_runner(export, LAPTOP, max_image_tokens=budget)
    runner.load()
    try:
        chunks = runner._chunks(bench_image(), PROMPT)
        entries = [mtmd.mtmd_input_chunks_get(chunks, i)
                   for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        count = sum(mtmd.mtmd_input_chunk_get_n_tokens(c) for c in entries
                    if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        mtmd.mtmd_input_chunks_free(chunks)
        return count
    finally:
        runner.close()


def test_run_onnx_budget_changes_image_tokens(exports, capsys):
    """tiny:smolvlm, 640x480: 2x2 tiles + global = 20 image tokens; a budget of 19 leaves one
    tile (splitting off) = 4 tokens, in the runner's preprocessing and in `run`'s prompt."""
    export = exports("onnx")
    folder = export / "onnx"
    image_id = preprocessor(folder).image_token_id
    counts = {}
    for budget in (None, 20, 19):
        ids = preprocessor(folder, budget)(bench_image(), PROMPT)["input_ids"]
        counts[budget] = (int((ids == image_id).sum()), ids.shape[1])
    assert [counts[b][0] for b in (None, 20, 19)] == [20, 20, 4]
    assert counts[19][0] == image_cost(folder, 640, 480, 19)["image_tokens"]
    assert _run(export, capsys) == counts[None][1]
    assert _run(export, capsys, "--max-image-tokens", "19") == counts[19][1] < counts[None][1]


def test_run_gguf_budget_changes_image_tokens(exports, capsys):
    """llama.cpp (mtmd) on tiny:smolvlm: 20 image tokens by default; the budget caps mtmd's
    tile grid at N - one tile (the global image is always added): 19 -> 2 tiles + global = 12,
    8 -> 1 tile + global = 8."""
    export = exports("gguf")
    assert [_gguf_image_tokens(export, b) for b in (None, 19, 8)] == [20, 12, 8]
    default = _run(export, capsys)
    assert default - _run(export, capsys, "--max-image-tokens", "8") >= 20 - 8


def test_run_gguf_qwen_budget_matches_onnx_preprocessing(exports, capsys):
    """Qwen2-VL: mtmd's image_max_tokens is the processor's max_pixels / 28^2, so llama.cpp
    gives the image the same 12 tokens for a budget of 16 as the onnxruntime runner's
    preprocessing (image_cost)."""
    from edgevlm.loader import materialize_tiny

    export = exports("gguf", "qwen2-vl")
    assert _gguf_image_tokens(export, 16) == 12 == image_cost(
        materialize_tiny("tiny:qwen2-vl"), 640, 480, 16)["image_tokens"]
    assert _gguf_image_tokens(export, None) > 12


def test_export_budget_is_read_back_by_both_runners(exports, capsys, tmp_path):
    """The budget recorded in an export (processor config for ONNX, manifest for GGUF) is the
    runners' default; hashes stay valid."""
    onnx = tmp_path / "onnx-budget"
    shutil.copytree(exports("onnx"), onnx)
    before = _run(onnx, capsys)
    from edgevlm.runtimes.artifact import open_export

    artifact, _ = open_export(onnx)
    record = record_in_export(onnx, artifact, 19)
    assert record["processor_settings"]["do_image_splitting"] is False
    processor = json.loads((onnx / "onnx/processor_config.json").read_text())
    assert processor["image_processor"]["do_image_splitting"] is False
    open_export(onnx)  # hashes updated
    assert json.loads((onnx / "manifest.json").read_text())["extra"]["image_budget"][
        "max_image_tokens"] == 19
    assert _run(onnx, capsys) == _run(exports("onnx"), capsys, "--max-image-tokens", "19") < before


def test_cli_export_gguf_records_the_budget(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "export", "--model", "tiny:smolvlm", "--target", "gguf", "--no-verify",
                 "--max-image-tokens", "8", "-o", str(out)]) == 0
    assert "image budget: at most 8 image tokens" in capsys.readouterr().out
    budget = json.loads((out / "manifest.json").read_text())["extra"]["image_budget"]
    assert budget == {"max_image_tokens": 8, "llama_cpp_image_max_tokens": 4}
    assert _gguf_image_tokens(out, None) == 8


@pytest.mark.parametrize("target, value, match", [
    ("onnx", "0", "must be at least 1"), ("gguf", "-3", "must be at least 1"),
    ("onnx", "3", "below the 4 tokens of one tile"),
    ("gguf", "4", "below the 8 tokens of one tile plus the global image"),
])
def test_bad_budget_is_a_one_line_usage_error(exports, capsys, target, value, match):
    assert main(["run", str(exports(target)), "--image", "builtin", "--max-tokens", "1",
                 "--device", "laptop-x86", "--max-image-tokens", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and match in err[0]
    assert err[1].startswith("  fix: ") and "--max-image-tokens" in err[1]


def test_bad_budget_on_bench_and_export(capsys, tmp_path):
    assert main(["bench", str(tmp_path), "--max-image-tokens", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert main(["export", "--model", "tiny:llava", "--target", "gguf", "--no-verify",
                 "--max-image-tokens", "10", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "below the" in err and "fix: use --max-image-tokens" in err
    assert not (tmp_path / "x").exists()


def test_inspect_prints_the_cost_of_an_image_size(capsys):
    assert main(["inspect", "tiny:smolvlm", "--image-size", "640x480",
                 "--max-image-tokens", "19"]) == 0
    out = capsys.readouterr().out
    assert "image 640x480  20 image tokens, 5 tiles" in out
    assert "--max-image-tokens 19: 4 image tokens, 1 tile" in out
    assert main(["inspect", "tiny:qwen2-vl", "--image-size", "640x480", "--max-image-tokens",
                 "16", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["image_cost"]
    assert (cost["default"]["image_tokens"], cost["budgeted"]["image_tokens"]) == (54, 12)
    assert np.prod(cost["budgeted"]["pixel_values_shape"][:1]) == 12 * 4  # 2x2 patches a token


@pytest.mark.parametrize("args, match", [
    (["--image-size", "640"], "not WIDTHxHEIGHT"),
    (["--image-size", "640x480", "--max-image-tokens", "3"], "below the 4 tokens"),
    (["--max-image-tokens", "16"], "needs --image-size"),
])
def test_inspect_bad_arguments(capsys, args, match):
    assert main(["inspect", "tiny:smolvlm", *args]) == 2
    assert match in capsys.readouterr().err
