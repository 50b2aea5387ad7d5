"""The command line: help, listings, inspect, and export's checks before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgevlm.cli import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("export", "score", "prune", "eval", "run", "bench", "inspect", "devices"):
        assert command in out
    assert main([]) == 2


@pytest.mark.parametrize("what, expect", [
    ("families", "qwen2.5-vl"), ("methods", "Block Influence"), ("targets", "q4_k_m"),
    ("tiny", "tiny:gemma3-k256"), ("random", "random:llava-1.5-7b"), ("devices", "laptop-x86"),
])
def test_list(capsys, what, expect):
    assert main(["list", what]) == 0
    assert expect in capsys.readouterr().out


def test_inspect_every_family(family, capsys):
    assert main(["inspect", f"tiny:{family}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family
    assert info["decoder_layers"] >= 6 and info["image_tokens_per_384px_image"] > 0
    assert set(info["parameters"]) == {"vision", "projector", "decoder", "embeddings", "lm_head"}
    assert info["targets"] == ["onnx", "gguf"]


def test_inspect_a_pruned_checkpoint_names_its_plan(tmp_path, capsys):
    from conftest import pruned_checkpoint

    folder = pruned_checkpoint("smolvlm", [2, 4], tmp_path / "pruned")
    assert main(["inspect", str(folder)]) == 0
    assert "dropped [2, 4] of 8 layers" in capsys.readouterr().out


@pytest.mark.parametrize("args, match", [
    (["--target", "onnx", "--quant", "q3"], "none, int8, q4"),
    (["--target", "gguf", "--quant", "q9_k"], "q4_k_m"),
    (["--target", "tflite"], "onnx, gguf"),
    (["--target", "onnx", "--vision-quant", "q4"], "vision"),
    (["--target", "gguf", "--method", "bi", "--ratio", "2"], "outside"),
])
def test_export_rejects_bad_options_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny:smolvlm", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_output_and_unwritable_paths(tmp_path, capsys):
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    assert main(["export", "--model", "tiny:smolvlm", "--target", "onnx", "-o", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (existing / "mine.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["export", "--model", "tiny:smolvlm", "--target", "onnx",
                 "-o", str(a_file / "out")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_default_model_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["export", "--method", "bi", "--ratio", "0.3", "--target", "gguf",
                 "-o", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "HuggingFaceTB/SmolVLM-256M-Instruct" in err and "tiny:smolvlm" in err
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_traceback():
    ok = subprocess.run([sys.executable, "-m", "edgevlm", "inspect", "/nonexistent"],
                        capture_output=True, text=True)
    assert ok.returncode == 2 and "Traceback" not in ok.stderr and "fix:" in ok.stderr
    verbose = subprocess.run([sys.executable, "-m", "edgevlm", "-v", "inspect", "/nonexistent"],
                             capture_output=True, text=True)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_export_onnx_end_to_end_writes_a_verified_manifest(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "export", "--model", "tiny:llava", "--method", "bi", "--ratio", "0.25",
                 "--target", "onnx", "--calib", "builtin:6", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["layers"] and manifest["io"]["num_layers"] == 6
    assert manifest["parity"]["greedy_tokens_equal"] is True
    _assert_every_check_printed(manifest["parity"], capsys.readouterr().out)
    for entry in manifest["files"]:
        assert (out / entry["path"]).stat().st_size == entry["bytes"]
    assert {p.name for p in out.iterdir()} == {"manifest.json", "onnx", "pruned", "plan.json",
                                               "scores.json", "layer_scores.png"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_gguf_export_without_llama_cpp_exits_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny:smolvlm", "--target", "gguf", "--calib", "builtin:4",
                 "-o", str(out)]) == 3
    assert "pip install" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_k_quant_fallback_is_reported(tmp_path, capsys):
    """tiny:smolvlm's rows (64, 128) do not fit q4_k_m's 256-blocks: llama.cpp stores them in
    a fallback type, and the export says which instead of hiding it."""
    out = tmp_path / "out"
    assert main(["-q", "export", "--model", "tiny:smolvlm", "--target", "gguf",
                 "--quant", "q4_k_m", "--calib", "builtin:4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fallback_tensors" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    _assert_every_check_printed(manifest["parity"], printed)
    fallback = manifest["quantization"]["fallback_tensors"]
    assert fallback and all(f["row"] % 256 and f["type"] != "Q4_K" for f in fallback)


def _assert_every_check_printed(parity: dict, printed: str) -> None:
    """Both targets: the CLI's parity line names every check with its value and tolerance."""
    assert parity["checks"] and "verified against PyTorch" in printed
    for check in parity["checks"]:
        bound = "recorded" if check["tolerance"] is None else f"{check['op']} "
        assert f"{check['name']} {check['value']:.3g} ({bound}" in printed
