"""Tokenizers in GGUF: llama.cpp must tokenize exactly as Hugging Face does, for the real
tokenizers shipped in edgevlm/tiny/real/ and the SentencePiece ones of the tiny models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("sentencepiece")

# ASCII, whitespace runs, digits, accents, CJK, emoji; the chat template's special tokens are
# added per tokenizer below.
TEXTS = ["Hello world", "What shape is in the image?", "  two  spaces\n\n\ttab\r\n end  ",
         "1234567 3.14159 2024-12-01", "café naïve Ünïcödé façade", "中文 日本語 한국어",
         "emoji 🙂👍🏽 ok", " leading space", "trailing space ", "a\n\nb", ""]


def _vocab_gguf(folder, out, vocab_size: int):
    """A vocabulary-only GGUF (llama arch keys + our tokenizer metadata)."""
    from gguf import GGUFWriter

    from edgevlm.export.gguf_export.tokenizer import add_tokenizer

    writer = GGUFWriter(str(out), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 256),
                       (writer.add_embedding_length, 64), (writer.add_head_count, 1),
                       (writer.add_feed_forward_length, 64)):
        add(value)
    info = add_tokenizer(writer, folder, vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return info


def _chat(tok) -> str:
    """The tokenizer's own chat template rendered: its special tokens in place."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi 12 ünï 中"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]
    try:
        return tok.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates that want plain-string content
        return tok.apply_chat_template([{"role": m["role"], "content": m["content"][0]["text"]}
                                        for m in messages], tokenize=False)


def _mismatches(folder, tmp_path) -> tuple[list, dict]:
    import llama_cpp
    from transformers import AutoTokenizer

    from edgevlm.runtimes.llamacpp_runner import silence_native_logs

    hf = AutoTokenizer.from_pretrained(folder)
    info = _vocab_gguf(folder, tmp_path / "vocab.gguf", len(hf))
    silence_native_logs()
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    texts = TEXTS + [_chat(hf)] + [f"{t} x{t}y" for t in hf.all_special_tokens]
    bad = []
    for text in texts:
        want = hf(text, add_special_tokens=False).input_ids
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        if got != want:
            bad.append((text, want, got))
    with_specials = hf("Hello").input_ids  # what HF adds around a text, llama.cpp must too
    if llm.tokenize(b"Hello", add_bos=True, special=True) != with_specials:
        bad.append(("<add_special_tokens>", with_specials, llm.tokenize(b"Hello", add_bos=True)))
    return bad, info


def _real(name):
    from edgevlm.tiny.presets import REAL_ROOT

    return REAL_ROOT / name


def _saved(tok, tmp_path):
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["SmolVLM-256M-Instruct", "Qwen2-VL-2B-Instruct"])
def test_real_tokenizers_match_hugging_face_in_llama_cpp(name, tmp_path):
    from transformers import AutoTokenizer

    folder = _real(name)
    if not (folder / "tokenizer.json").exists():  # Qwen2-VL ships vocab.json + merges.txt
        folder = _saved(AutoTokenizer.from_pretrained(folder), tmp_path)
    bad, info = _mismatches(folder, tmp_path)
    assert not bad, bad[:3]
    assert info["model"] == "gpt2"


# Real tokenizers that may not be copied into the repo (Llama 2 licence, Qwen Research licence):
# tested when EDGEVLM_REAL_MODELS names a folder holding the hub files (llava-1.5-7b-hf/,
# Qwen2.5-VL-3B-Instruct/). Gemma 3's tokenizer files were not available at all.
REAL_MODELS = os.environ.get("EDGEVLM_REAL_MODELS")


@pytest.mark.parametrize("name,model", [("llava-1.5-7b-hf", "llama"),
                                        ("Qwen2.5-VL-3B-Instruct", "gpt2")])
def test_unshipped_real_tokenizers_match_hugging_face_in_llama_cpp(name, model, tmp_path):
    """LLaVA-1.5's Llama-2 SentencePiece tokenizer.model (read as llama.cpp's converter does)
    and Qwen2.5-VL's byte-level BPE, from the real files."""
    from transformers import AutoTokenizer

    folder = Path(REAL_MODELS or "") / name
    if not REAL_MODELS or not folder.is_dir():
        pytest.skip(f"set EDGEVLM_REAL_MODELS to a folder holding {name}/ (not redistributable)")
    if not (folder / "tokenizer.json").exists():
        folder = _saved(AutoTokenizer.from_pretrained(folder), tmp_path)
    bad, info = _mismatches(folder, tmp_path)
    assert not bad, bad[:3]
    assert info["model"] == model
    if model == "llama":
        assert "tokenizer.model" in info["notes"][0] and info["space_prefix"] is True


@pytest.mark.parametrize("family,space_prefix", [("llava", True), ("gemma3", False)])
def test_tiny_sentencepiece_tokenizers_match_in_llama_cpp(family, space_prefix, tmp_path):
    """The tiny LLaVA (Llama-2 style: '▁' before each text segment) and Gemma 3 (none)
    tokenizers are real SentencePiece models; transformers saves only tokenizer.json, so the
    scores come from its merge ranks."""
    from edgevlm.tiny import build_tiny

    _model, processor = build_tiny(f"tiny:{family}")
    folder = _saved(processor.tokenizer, tmp_path)
    assert not (folder / "tokenizer.model").exists()
    bad, info = _mismatches(folder, tmp_path)
    assert not bad, bad[:3]
    assert info["model"] == "llama" and info["space_prefix"] is space_prefix
    assert info["add_bos"] is True


def test_tokenizer_model_and_tokenizer_json_give_the_same_vocabulary(tmp_path):
    """With tokenizer.model beside tokenizer.json the pieces, scores and kinds are read from it
    as llama.cpp's converter does; both sources tokenize alike (scores differ in scale only)."""
    from gguf import GGUFReader

    from edgevlm.tiny.llava import SPECIALS
    from edgevlm.tiny.tokenizer import sentencepiece_model, train_sentencepiece

    kw = dict(vocab_size=384, space_prefix=True)
    tok = train_sentencepiece(SPECIALS, chat_template="{{ bos_token }}", bos="<s>", eos="</s>",
                              pad="<pad>", unk="<unk>", **kw)
    folder = _saved(tok, tmp_path / "a")
    bad, from_json = _mismatches(folder, tmp_path / "a")
    assert not bad, bad[:3]
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(SPECIALS, unk="<unk>", **kw))
    (tmp_path / "b").mkdir()
    bad, from_model = _mismatches(folder, tmp_path / "b")
    assert not bad, bad[:3]
    assert "tokenizer.model" in from_model["notes"][0] and "merge" in from_json["notes"][0]
    reader = GGUFReader(str(tmp_path / "b" / "vocab.gguf"))
    types = reader.fields["tokenizer.ggml.token_type"]
    kinds = {int(types.parts[i][0]) for i in types.data}
    # normal, control (HF special tokens, <unk> included, as the converter marks them) and
    # byte-fallback pieces
    assert {1, 3, 6} <= kinds


def test_sentencepiece_that_llama_cpp_cannot_reproduce_is_refused(tmp_path):
    """legacy=False Llama tokenizers write '▁' only at the very start; llama.cpp writes it
    after every special token: refused, not silently different."""
    import json

    from edgevlm.errors import UnsupportedModelError
    from edgevlm.export.gguf_export.tokenizer import tokenizer_plan
    from edgevlm.tiny import build_tiny

    folder = _saved(build_tiny("tiny:llava")[1].tokenizer, tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                             "prepend_scheme": "first", "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match="very start"):
        tokenizer_plan(folder)
    shutil.rmtree(folder)
