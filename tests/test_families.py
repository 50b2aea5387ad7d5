"""Issue 13 item 1: the family table (edgevlm.runtimes.families) is self-consistent and is what
adapters, exporters, runners and tiny models agree with; it imports without torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from edgevlm.runtimes import families
from edgevlm.runtimes.families import FAMILIES, TABLE


def test_imports_with_torch_blocked():
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'numpy'): sys.modules[m] = None\n"
        "from edgevlm.runtimes import families\n"
        "assert families.for_model_type('idefics3').name == 'smolvlm'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_table_is_well_formed():
    assert len(FAMILIES) == len(TABLE)
    model_types = [t for f in TABLE for t in f.model_types]
    assert len(model_types) == len(set(model_types)), "a model_type in two families"
    for f in TABLE:
        assert all(families.for_model_type(t) is f for t in f.model_types)
        assert families.for_config({"model_type": f.model_types[0]}) is f
        assert set(f.targets) <= {"onnx", "gguf"}
        assert set(f.known_defects) <= set(f.targets)
        assert f.gguf_tokenizer in ("gpt2", "llama")
        assert f.onnx_vision_inputs[0] == "pixel_values"
        assert set(f.image_token_keys) <= set(families.IMAGE_TOKEN_KEYS)
    assert families.for_model_type("bert") is None and families.for_model_type(None) is None


def test_every_family_has_its_code():
    """An adapter built from the entry, a tiny factory, a GGUF writer module, a runner
    preprocessor; and every tiny: name resolves to a family of the table."""
    from edgevlm.adapters import ADAPTERS
    from edgevlm.runtimes.preprocess import PROCESSORS
    from edgevlm.tiny import FACTORIES, parse_tiny, tiny_names

    assert ADAPTERS.names() == list(FAMILIES)
    assert sorted(FACTORIES.names()) == sorted(FAMILIES)
    assert set(PROCESSORS) == set(FAMILIES)
    for f in TABLE:
        adapter = ADAPTERS.get(f.name)
        assert adapter.family == f.name and adapter.model_types == f.model_types
        assert adapter.image_token_keys == f.image_token_keys
        assert importlib.util.find_spec(f"edgevlm.export.gguf_export.{f.gguf_writer}"), f.name
    for name in tiny_names():
        assert parse_tiny(name)[0] in FAMILIES, name


def test_gguf_family_module_reads_the_table():
    from edgevlm.errors import UnsupportedModelError
    from edgevlm.export.gguf_export.families import family_module

    for f in TABLE:
        for t in f.model_types:
            name, module = family_module({"model_type": t})
            assert name == f.name and module.__name__.endswith("." + f.gguf_writer)
    with pytest.raises(UnsupportedModelError):
        family_module({"model_type": "bert"})


def test_onnx_file_names_and_runner_vision_feeds():
    from edgevlm.runtimes.ort_generate import vision_inputs

    assert families.onnx_graph("decoder_model_merged", "q4") == "decoder_model_merged_q4.onnx"
    assert families.onnx_graph("vision_encoder") == "vision_encoder.onnx"
    pixels = {"pixel_values": np.zeros((1, 2, 3, 4, 4), np.float32),
              "image_grid_thw": np.array([[1, 2, 2]]), "pixel_attention_mask": None}
    for f in TABLE:
        inputs = dict(pixels)
        if f.name != "smolvlm":
            inputs["pixel_values"] = np.zeros((1, 3, 4, 4), np.float32)
        assert tuple(vision_inputs(f.name, {}, inputs)) == f.onnx_vision_inputs, f.name


def test_image_token_id_lookup():
    assert families.image_token_id({"image_token_index": 7}) == 7
    assert families.image_token_id({"image_token_id": 3, "image_token_index": 7}) == 3
    assert families.image_token_id({"text_config": {"image_token_id": 5}}) == 5
    assert families.image_token_id({}) is None


def test_user_turn():
    assert families.user_turn("hi") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert [c["type"] for c in families.user_turn("hi", 2)[0]["content"]] == ["image", "image", "text"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_checkpoint_agrees_with_the_table(name):
    """The tiny checkpoint's config.json maps back to its family; the image token, placeholder,
    chat-template image text and GGUF tokenizer model of the table are the checkpoint's;
    Gemma 3's layer period."""
    pytest.importorskip("torch")
    from edgevlm.export.gguf_export.tokenizer import tokenizer_plan
    from edgevlm.loader import materialize_tiny
    from edgevlm.runtimes.preprocess import load_preprocessor

    spec = FAMILIES[name]
    folder = materialize_tiny(f"tiny:{name}")
    config = json.loads((folder / "config.json").read_text())
    assert families.for_config(config) is spec
    pre = load_preprocessor(folder)
    assert pre.family == name
    assert pre.tokens.token_id(spec.image_token) == families.image_token_id(config)
    assert pre.tokens.token_id(spec.placeholder) is not None
    text = pre.chat_text("hi")  # the chat template's image text: what both runners replace
    assert spec.placeholder in text and spec.gguf_image_text in text
    assert tokenizer_plan(folder).model == spec.gguf_tokenizer
    types = (config.get("text_config") or config).get("layer_types") or []
    if spec.layer_period:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        assert full and all(b - a == spec.layer_period for a, b in zip(full, full[1:], strict=False))
        assert full[0] == spec.layer_period - 1


def test_list_families_prints_the_table(capsys):
    from edgevlm.cli import main

    assert main(["list", "families"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(FAMILIES)
    for f, line in zip(TABLE, lines, strict=True):
        assert f"{f.gguf_text_arch}/{f.gguf_projector}" in line and "/".join(f.model_types) in line
        assert ("defect" in line) == bool(f.known_defects)
