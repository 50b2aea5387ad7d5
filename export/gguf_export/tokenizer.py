"""Tokenizer metadata for the text GGUF: vocabulary, merges, token types, special ids and the
chat template, read from the checkpoint's tokenizer.json / tokenizer_config.json.

llama.cpp does not run the tokenizer.json pipeline: it knows a fixed set of pre-tokenizers by
name (`tokenizer.ggml.pre`), each a list of split regexes. `tokenizer_plan` recognizes the
pre-tokenizer structure of a checkpoint and names the llama.cpp equivalent, or refuses it
before any work, so an export never tokenizes differently from Hugging Face.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgevlm.errors import UnsupportedModelError

# llama.cpp token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes as tokenizer.json spells them. GPT2 is also what ByteLevel(use_regex=True)
# applies; QWEN2 and LLAMA3 are the Split patterns of the Qwen2 and Llama-3 tokenizers (they
# differ only in \p{N} vs \p{N}{1,3}). llama.cpp's llama-vocab.cpp runs equivalent regexes for
# the pre-tokenizer names below.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS = "Digits(individual_digits)"
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback pieces  # a split of every digit, like llama.cpp's "\p{N}" regex

# (split steps in order, BPE ignore_merges) -> llama.cpp tokenizer.ggml.pre. ignore_merges
# must match: llama.cpp's "llama-bpe" looks whole words up in the vocabulary first (as HF does
# with ignore_merges), the others always merge.
PRE_TOKENIZERS = {
    ((GPT2_REGEX,), False): "gpt-2",
    ((DIGITS, GPT2_REGEX), False): "smollm",  # SmolLM / SmolLM2 (StarCoder-style digits)
    ((QWEN2_REGEX,), False): "qwen2",
    ((LLAMA3_REGEX,), True): "llama-bpe",
}
# Normalizers llama.cpp's BPE path can skip: NFC is the identity on NFC text (Qwen2 declares it;
# llama.cpp's own converter maps such tokenizers to "qwen2" the same way).
SKIPPABLE_NORMALIZERS = {None, "NFC"}

SPM_FIX = ("put the model's SentencePiece tokenizer.model next to config.json (llama.cpp needs "
           "its piece scores, which tokenizer.json does not carry), or export --target onnx")


@dataclass
class TokenizerPlan:
    """What the text GGUF's tokenizer.* keys will say, decided from tokenizer.json."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    add_bos: bool  # the HF post-processor prepends BOS
    add_eos: bool  # the HF post-processor appends EOS
    bos_id: int | None = None
    eos_id: int | None = None
    notes: list[str] = field(default_factory=list)
    space_prefix: bool = False  # HF writes a '▁' before each text segment (SentencePiece)


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _refuse(found: str, fix: str = ""):
    raise UnsupportedModelError(
        f"the checkpoint's tokenizer has {found}, which llama.cpp cannot reproduce: the GGUF "
        "would tokenize differently from Hugging Face",
        fix or "supported byte-level BPE pre-tokenizers: " + ", ".join(
            sorted(set(PRE_TOKENIZERS.values()))))


def _is_sentencepiece(model: dict, tok_json: dict) -> bool:
    """BPE/Unigram vocabularies in SentencePiece style (Llama-2, Gemma): '▁' word markers,
    byte fallback tokens, Metaspace pre-tokenizer or a normalizer that writes '▁'."""
    if model.get("type") == "Unigram" or model.get("byte_fallback"):
        return True
    text = json.dumps([tok_json.get("pre_tokenizer"), tok_json.get("normalizer"),
                       tok_json.get("decoder")])
    return "Metaspace" in text or "\\u2581" in text or "\u2581" in text


def _flatten(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "normalizers"
        return [leaf for child in node.get(key, []) for leaf in _flatten(child)]
    return [node]


def _split_steps(pre: dict | None) -> list[str]:
    """The pre-tokenizer as an ordered list of split regexes (DIGITS for a Digits split); the
    final ByteLevel contributes the GPT-2 regex when use_regex is on."""
    steps: list[str] = []
    leaves = _flatten(pre)
    byte_level = [i for i, p in enumerate(leaves) if p.get("type") == "ByteLevel"]
    if not leaves or byte_level != [len(leaves) - 1]:
        _refuse(f"pre-tokenizer {[p.get('type') for p in leaves]} (no single final ByteLevel)")
    for p in leaves[:-1]:
        kind = p.get("type")
        if kind == "Split":
            pattern = p.get("pattern") or {}
            if "Regex" not in pattern or p.get("behavior") != "Isolated" or p.get("invert"):
                _refuse(f"a Split pre-tokenizer {json.dumps(p)[:120]} (only Isolated regex "
                        "splits are handled)")
            steps.append(pattern["Regex"])
        elif kind == "Digits" and p.get("individual_digits"):
            steps.append(DIGITS)
        else:
            _refuse(f"a {kind} pre-tokenizer ({json.dumps(p)[:120]})")
    last = leaves[-1]
    if last.get("add_prefix_space"):
        _refuse("ByteLevel(add_prefix_space=True): HF prepends a space to the text, llama.cpp's "
                "BPE tokenizer never does")
    if last.get("use_regex", True):
        steps.append(GPT2_REGEX)
    return steps


def _special_added(tok, bos_id, eos_id) -> tuple[bool, bool]:
    """(add_bos, add_eos) as the post-processor really behaves: encode a probe with and
    without special tokens and look at what was added around it."""
    plain = tok.encode("a b", add_special_tokens=False).ids
    full = tok.encode("a b", add_special_tokens=True).ids
    start = next((i for i in range(len(full) - len(plain) + 1)
                  if full[i: i + len(plain)] == plain), None)
    if start is None:
        _refuse("a post-processor that rewrites the text's tokens")
    prefix, suffix = full[:start], full[start + len(plain):]
    if prefix not in ([], [bos_id]) or suffix not in ([], [eos_id]):
        _refuse(f"a post-processor that adds tokens {prefix} before / {suffix} after the text "
                f"(llama.cpp can only add the BOS {bos_id} / EOS {eos_id})")
    return bool(prefix), bool(suffix)


def _read(folder: Path) -> tuple[dict, dict]:
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        if (folder / "tokenizer.model").exists():
            raise UnsupportedModelError(
                "the checkpoint has a SentencePiece tokenizer.model but no tokenizer.json",
                "save the tokenizer with transformers (save_pretrained writes tokenizer.json)")
        raise UnsupportedModelError(f"{folder} has no tokenizer.json",
                                    "save the processor next to the model (save_pretrained)")
    cfg_path = folder / "tokenizer_config.json"
    return (json.loads(path.read_text()),
            json.loads(cfg_path.read_text()) if cfg_path.exists() else {})


def _special_ids(tok_json: dict, tok_cfg: dict) -> dict[str, int]:
    vocab = dict(tok_json.get("model", {}).get("vocab") or {})
    vocab.update({a["content"]: a["id"] for a in tok_json.get("added_tokens", [])})
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        text = _token_text(tok_cfg.get(f"{key}_token"))
        if text is not None and text in vocab:
            ids[key] = vocab[text]
    return ids


def tokenizer_plan(folder: Path) -> TokenizerPlan:
    """The llama.cpp tokenizer model and pre-tokenizer for a checkpoint folder's tokenizer.

    Raises UnsupportedModelError (a UsageError), naming what was found, for tokenizers llama.cpp
    would run differently: SentencePiece vocabularies, unknown split regexes, normalizers,
    ByteLevel with a prefix space, post-processors adding more than BOS/EOS. Cheap: meant to
    run before any model is loaded or written.
    """
    tok_json, tok_cfg = _read(folder)
    model = tok_json.get("model") or {}
    if _is_sentencepiece(model, tok_json):
        return _sentencepiece_plan(Path(folder), tok_json, tok_cfg)
    if model.get("type") != "BPE":
        _refuse(f"a {model.get('type')} model (only byte-level BPE is written)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            _refuse(f"BPE {key}={model[key]!r}")
    notes = []
    norms = _flatten(tok_json.get("normalizer"))
    for norm in norms:
        if norm.get("type") not in SKIPPABLE_NORMALIZERS:
            _refuse(f"a {norm.get('type')} normalizer ({json.dumps(norm)[:120]})")
        notes.append(f"{norm['type']} normalizer not applied by llama.cpp (identity on "
                     f"{norm['type']} text)")
    steps = _split_steps(tok_json.get("pre_tokenizer"))
    ignore_merges = bool(model.get("ignore_merges"))
    pre = PRE_TOKENIZERS.get((tuple(steps), ignore_merges))
    if pre is None:
        _refuse("pre-tokenizer splits [" + ", ".join(_short(s) for s in steps)
                + f"] with ignore_merges={ignore_merges}")
    ids = _special_ids(tok_json, tok_cfg)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tok_json))
    add_bos, add_eos = _special_added(tok, ids.get("bos"), ids.get("eos"))
    return TokenizerPlan("gpt2", pre, add_bos, add_eos, ids.get("bos"), ids.get("eos"), notes)


def _sentencepiece_plan(folder: Path, tok_json: dict, tok_cfg: dict) -> TokenizerPlan:
    """llama.cpp's SentencePiece model ("llama") for a Llama-2 / Gemma style tokenizer: the
    special tokens HF adds, and whether it writes a '▁' before each text segment, are read off
    the HF tokenizer's behaviour."""
    model = tok_json.get("model") or {}
    if not (folder / "tokenizer.model").exists() and (
            model.get("type") != "BPE" or not model.get("byte_fallback")):
        raise UnsupportedModelError(
            f"the checkpoint's SentencePiece-style tokenizer ({model.get('type')}, byte_fallback "
            f"{bool(model.get('byte_fallback'))}) has no tokenizer.model", SPM_FIX)
    pre = tok_json.get("pre_tokenizer") or {}
    for leaf in _flatten(pre):
        if leaf.get("type") == "Metaspace" and leaf.get("prepend_scheme") == "first":
            _refuse("a Metaspace pre-tokenizer that writes '▁' only at the very start "
                    "(legacy=False; llama.cpp writes it after every special token too)",
                    "save the tokenizer with legacy=True, or export --target onnx")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tok_json))
    ids = _special_ids(tok_json, tok_cfg)
    add_bos, add_eos = _special_added(tok, ids.get("bos"), ids.get("eos"))
    first = tok.encode("a", add_special_tokens=False).tokens
    source = "tokenizer.model" if (folder / "tokenizer.model").exists() else \
        "tokenizer.json (scores from the merge ranks)"
    return TokenizerPlan("llama", "default", add_bos, add_eos, ids.get("bos"), ids.get("eos"),
                         notes=[f"SentencePiece pieces and scores from {source}"],
                         space_prefix=bool(first) and first[0].startswith("\u2581"))


def _pieces_from_model(path: Path):
    """(pieces, scores, types) of a tokenizer.model, typed as llama.cpp's converter does."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    ids = range(sp.vocab_size())
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
             else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL for i in ids]
    return [sp.id_to_piece(i) for i in ids], [sp.get_score(i) for i in ids], types


def _pieces_from_json(model: dict):
    """The same from a SentencePiece-BPE tokenizer.json (transformers saves no tokenizer.model).
    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest;
    HF's BPE merges the lowest-ranked pair. A piece scored minus the rank of the first merge
    that makes it orders merges the same way (the hub's files rank merges by piece score)."""
    vocab: dict[str, int] = model["vocab"]
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    pieces = sorted(vocab, key=vocab.get)
    unk = model.get("unk_token")
    types = [UNKNOWN if p == unk else BYTE if _BYTE.fullmatch(p) else NORMAL for p in pieces]
    return pieces, [-float(rank.get(p, 0)) for p in pieces], types


def _sentencepiece_vocab(folder: Path, tok_json: dict, size: int):
    """(tokens, scores, types) as llama.cpp's converter derives them: every piece with its
    score and kind, then the HF added tokens over them (special: control, else user-defined
    with '▁' read as a space), then padding rows."""
    model_file = folder / "tokenizer.model"
    pieces, piece_scores, piece_types = (_pieces_from_model(model_file) if model_file.exists()
                                         else _pieces_from_json(tok_json["model"]))
    n = max(size, len(pieces))
    tokens = pieces + [f"[PAD{i}]" for i in range(len(pieces), n)]
    scores = piece_scores + [-1000.0] * (n - len(pieces))
    types = piece_types + [UNUSED] * (n - len(pieces))
    for added in tok_json.get("added_tokens", []):
        idx, text = added["id"], added["content"]
        if idx >= n:
            raise UnsupportedModelError(f"added token {text!r} has id {idx} beyond the "
                                        f"embedding's {n} rows", "fix the checkpoint's vocab_size")
        special = bool(added.get("special"))
        tokens[idx] = text if special else text.replace("\u2581", " ")
        types[idx], scores[idx] = (CONTROL if special else USER_DEFINED), -1000.0
    return tokens, scores, types


def add_tokenizer(writer, folder: Path, vocab_size: int) -> dict:
    """Write tokenizer.* keys and tokenizer.chat_template; returns a summary for the manifest.

    Byte-level BPE tokenizers (llama.cpp's "gpt2" model, with the pre-tokenizer named by
    `tokenizer_plan`) and SentencePiece ones (llama.cpp's "llama" model, from tokenizer.model);
    `tokenizer_plan` refuses everything else.
    """
    folder = Path(folder)
    plan = tokenizer_plan(folder)
    tok_json, tok_cfg = _read(folder)
    if plan.model == "llama":
        tokens, scores, types = _sentencepiece_vocab(folder, tok_json, vocab_size)
        writer.add_tokenizer_model(plan.model)
        writer.add_tokenizer_pre(plan.pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        return _add_common(writer, folder, plan, tok_json, tok_cfg,
                           {"n_tokens": len(tokens), "space_prefix": plan.space_prefix})
    model = tok_json["model"]
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

    writer.add_tokenizer_model(plan.model)
    writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    return _add_common(writer, folder, plan, tok_json, tok_cfg,
                       {"n_tokens": size, "n_merges": len(merges)})


def _add_common(writer, folder: Path, plan: TokenizerPlan, tok_json: dict, tok_cfg: dict,
                summary: dict) -> dict:
    """Special ids, what llama.cpp adds around a text, and the chat template."""
    ids = _special_ids(tok_json, tok_cfg)
    if "bos" in ids:
        writer.add_bos_token_id(ids["bos"])
    if "eos" in ids:
        writer.add_eos_token_id(ids["eos"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    if "unk" in ids:
        writer.add_unk_token_id(ids["unk"])
    # Mirror the HF post-processor so llama.cpp adds exactly the special tokens HF adds
    # (chat templates that want BOS write it themselves), and its '▁' before each text segment
    # (SentencePiece; byte-level BPE never: tokenizer_plan refuses add_prefix_space).
    writer.add_add_bos_token(plan.add_bos)
    writer.add_add_eos_token(plan.add_eos)
    writer.add_add_space_prefix(plan.space_prefix)

    template = chat_template(folder, tok_cfg)
    if template:
        writer.add_chat_template(template)
    return {"model": plan.model, "pre": plan.pre, **summary,
            "special_ids": ids, "add_bos": plan.add_bos, "add_eos": plan.add_eos,
            "notes": plan.notes, "chat_template": bool(template)}


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """The model's chat template: chat_template.jinja, or the tokenizer_config entry."""
    path = Path(folder) / "chat_template.jinja"
    if path.exists():
        return path.read_text()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
