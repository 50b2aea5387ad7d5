"""Real checkpoint layouts: random: presets built from the real models' files, the flat
Qwen2-VL config, and the full-size SmolVLM exported with verification on."""

from __future__ import annotations

import json

import pytest


def _walk(node, key, path=""):
    """Every (path, value) of `key` anywhere in a config dict."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield path + k, v
            yield from _walk(v, key, f"{path}{k}.")


def test_flat_qwen2_vl_config_pruned_says_the_new_count_everywhere(tmp_path):
    """The hub's Qwen2-VL config.json is flat (text keys at top level). After pruning, every
    layer count a reader could pick up is the new one, and the GGUF writer reads it."""
    from transformers import AutoConfig

    from edgevlm.export.gguf_export import check_gguf_quant
    from edgevlm.export.gguf_export.source import read_config
    from edgevlm.prune import _slice_config
    from edgevlm.tiny.presets import real_folder

    folder = real_folder("qwen2-vl-2b")
    raw = json.loads((folder / "config.json").read_text())
    assert "text_config" not in raw and raw["num_hidden_layers"] == 28  # really flat
    assert read_config(folder)["text_config"]["num_hidden_layers"] == 28
    config = AutoConfig.from_pretrained(folder)
    kept = [i for i in range(28) if i % 4]  # 21 layers
    _slice_config(config.get_text_config(), kept, 28, ())
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("num_hidden_layers", "max_window_layers"):
        found = dict(_walk(saved, key))
        assert found and set(found.values()) == {21}, (key, found)
    assert all(len(v) == 21 for _p, v in _walk(saved, "layer_types"))
    cfg = read_config(tmp_path)
    assert cfg["text_config"]["num_hidden_layers"] == 21
    check_gguf_quant("q4_0", cfg)


def test_random_presets_take_the_real_files(tmp_path):
    from edgevlm.tiny.presets import real_files

    names = {f.name for f in real_files("random:smolvlm-256m")}
    assert {"config.json", "tokenizer.json", "preprocessor_config.json",
            "chat_template.json"} <= names
    assert {"vocab.json", "merges.txt", "config.json"} <= {
        f.name for f in real_files("qwen2-vl-2b")}
    assert real_files("llava-1.5-7b") == []  # not Apache-2.0: sizes only (presets.py)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gguf", "onnx"])
def test_full_size_smolvlm_exports_with_verification_on(target, tmp_path, capsys):
    """SmolVLM-256M at its real size (real config, processor, tokenizer; random weights), BI
    30%, default quantization, verified: one held-out sample whose image the real processor
    makes 13+ tiles (832+ image tokens), more than the old 1024-token llama.cpp context held
    with the greedy steps. Kept cheap: builtin:2 calibration."""
    pytest.importorskip("llama_cpp" if target == "gguf" else "onnxruntime")
    from edgevlm.cli import main

    out = tmp_path / "out"
    rc = main(["-q", "export", "--model", "random:smolvlm-256m", "--method", "bi", "--ratio",
               "0.3", "--calib", "builtin:2", "--target", target, "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["parity"]
    assert "verified against PyTorch" in printed
    if target == "gguf":
        assert parity["passed"] and all(c["ok"] for c in parity["checks"])
        assert parity["n_ctx"] >= 1024 + 256  # sized from the sample, not fixed
        for check in parity["checks"]:  # the CLI line lists every check with its tolerance
            assert check["what"] in printed
        assert manifest["io"]["n_layers"] == 21
    else:
        assert parity["greedy_tokens_equal"]
