"""Tokenizer metadata for the text GGUF: vocabulary, merges, token types, special ids and the
chat template, read from the checkpoint's tokenizer.json / tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from edgevlm.errors import UnsupportedModelError

# llama.cpp token types (llama_token_type): normal, control (special), user-defined.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def add_tokenizer(writer, folder: Path, vocab_size: int) -> dict:
    """Write tokenizer.* keys and tokenizer.chat_template; returns a summary for the manifest.

    Only byte-level BPE tokenizers (tokenizer.json model "BPE" with a ByteLevel
    pre-tokenizer) are handled: that is what llama.cpp's "gpt2" model means.
    """
    folder = Path(folder)
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
    model = tok_json.get("model", {})
    pre = tok_json.get("pre_tokenizer") or {}
    pre_types = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if model.get("type") != "BPE" or "ByteLevel" not in pre_types:
        raise UnsupportedModelError(
            f"tokenizer type {model.get('type')} with pre-tokenizer {pre_types} is not supported "
            "by the GGUF writer", "only byte-level BPE tokenizers (GPT-2 style) are handled so far")

    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    user: set[int] = set()
    for added in tok_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        (special if added.get("special") else user).add(added["id"])
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [USER_DEFINED] * size  # padding rows the embedding has but the tokenizer lacks
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = CONTROL if idx in special else USER_DEFINED if idx in user else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    # llama.cpp's "gpt-2" pre-tokenizer is the GPT-2 regex that ByteLevel(use_regex) applies.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        text = _token_text(tok_cfg.get(f"{key}_token"))
        if text is not None and text in vocab:
            ids[key] = vocab[text]
    if "bos" in ids:
        writer.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        writer.add_eos_token_id(ids["eos"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    if "unk" in ids:
        writer.add_unk_token_id(ids["unk"])
    # The HF post-processor decides whether BOS is prepended; chat templates that want it
    # write it themselves. Mirror the post-processor so llama.cpp tokenizes identically.
    add_bos = _post_processor_adds_bos(tok_json, ids.get("bos"))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)

    template = chat_template(folder, tok_cfg)
    if template:
        writer.add_chat_template(template)
    return {"model": "gpt2", "pre": "gpt-2", "n_tokens": size, "n_merges": len(merges),
            "special_ids": ids, "add_bos": add_bos, "chat_template": bool(template)}


def _post_processor_adds_bos(tok_json: dict, bos_id: int | None) -> bool:
    post = tok_json.get("post_processor") or {}
    if bos_id is None or post.get("type") != "TemplateProcessing":
        return False
    first = (post.get("single") or [{}])[0]
    return "SpecialToken" in first


def chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """The model's chat template: chat_template.jinja, or the tokenizer_config entry."""
    path = Path(folder) / "chat_template.jinja"
    if path.exists():
        return path.read_text()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
