"""How close a run comes to the device's limits: decode against memory bandwidth, prefill and
image encoding against peak compute. Numbers from the model's shapes, numpy-free.

Decode reads every decoder weight once per token plus the KV cache written so far, so
bytes/token = decoder weight bytes + KV bytes per cached token x context; tok/s x bytes/token
over the profile's bandwidth is the fraction of the roofline reached. Prefill and the vision
tower are matmul-bound: 2 FLOPs per weight per row, plus attention (QK^T and AV).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TextShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def matmul_params(self) -> int:
        """Weights multiplied per token: q/k/v/o and the gated MLP in every layer, lm_head."""
        per_layer = (self.hidden * self.head_dim * (self.heads + 2 * self.kv_heads)
                     + self.heads * self.head_dim * self.hidden + 3 * self.hidden * self.ffn)
        return self.layers * per_layer + self.hidden * self.vocab

    def kv_values_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim

    def prefill_flops(self, tokens: int, past: int = 0) -> float:
        """FLOPs of a causal prompt of `tokens` after `past` cached ones."""
        attention = 4 * self.layers * self.heads * self.head_dim * tokens * (past + (tokens + 1) / 2)
        return 2.0 * self.matmul_params * tokens + attention


@dataclass
class VisionShape:
    layers: int
    hidden: int
    ffn: int
    patches_per_tile: int  # sequence length of one encoder call per tile/image
    tokens_per_tile: int  # image tokens the decoder gets per tile (after pixel shuffle/pooling)

    def image_flops(self, image_tokens: int) -> float:
        return self.flops(image_tokens / self.tokens_per_tile)

    def flops(self, tiles: float) -> float:
        """A ViT over `tiles` independent tiles: 4 h^2 (qkv+o) + 2 h f (MLP) weights per patch,
        2 FLOPs each, plus attention within each tile. The projector is small and left out."""
        n = self.patches_per_tile
        weights = 4 * self.hidden ** 2 + 2 * self.hidden * self.ffn
        per_tile = self.layers * (2.0 * weights * n + 4.0 * self.hidden * n * n)
        return tiles * per_tile


def text_shape_from_config(config: dict) -> TextShape:
    """From a Hugging Face config.json (the text part of a VLM's)."""
    t = config.get("text_config", config)
    heads = int(t["num_attention_heads"])
    return TextShape(layers=int(t["num_hidden_layers"]), hidden=int(t["hidden_size"]), heads=heads,
                     kv_heads=int(t.get("num_key_value_heads") or heads),
                     head_dim=int(t.get("head_dim") or t["hidden_size"] // heads),
                     ffn=int(t["intermediate_size"]), vocab=int(t["vocab_size"]))


def vision_shape_from_config(config: dict) -> VisionShape | None:
    v = config.get("vision_config")
    if not v:
        return None
    hidden = int(v.get("hidden_size") or v.get("embed_dim"))
    ffn = int(v.get("intermediate_size") or hidden * float(v.get("mlp_ratio", 4)))
    patch = int(v["patch_size"])
    size = v.get("image_size")
    # Qwen2-VL has no fixed tile (attention spans the whole image): no image roofline.
    if not size:
        return None
    patches = (int(size) // patch) ** 2
    tokens = (config.get("mm_tokens_per_image")  # Gemma 3
              or patches // int(config.get("scale_factor", 1)) ** 2)  # SmolVLM pixel shuffle
    return VisionShape(layers=int(v.get("num_hidden_layers") or v["depth"]), hidden=hidden, ffn=ffn,
                       patches_per_tile=patches, tokens_per_tile=int(tokens))


def text_shape_from_gguf(meta: dict) -> TextShape:
    """From a text GGUF's metadata (llama.cpp keys: <arch>.block_count, ...)."""
    arch = meta["general.architecture"]

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        return int(value) if value is not None else None

    hidden, heads = key("embedding_length"), key("attention.head_count")
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) or None
    return TextShape(layers=key("block_count"), hidden=hidden, heads=heads,
                     kv_heads=key("attention.head_count_kv", heads),
                     head_dim=key("attention.key_length", hidden // heads),
                     ffn=key("feed_forward_length"), vocab=vocab or 0)


def vision_shape_from_gguf(meta: dict) -> VisionShape | None:
    """From an mmproj GGUF's metadata (clip.vision.*); None where the tile is not fixed."""
    if meta.get("clip.projector_type") in ("qwen2vl_merger", "qwen25vl_merger"):
        return None
    try:
        size, patch = int(meta["clip.vision.image_size"]), int(meta["clip.vision.patch_size"])
        patches = (size // patch) ** 2
        scale = int(meta.get("clip.vision.projector.scale_factor") or 1)
        tokens = patches // scale ** 2
        if meta.get("clip.projector_type") == "gemma3":
            tokens = 256  # Gemma 3 pools every image to 256 tokens
        return VisionShape(layers=int(meta["clip.vision.block_count"]),
                           hidden=int(meta["clip.vision.embedding_length"]),
                           ffn=int(meta["clip.vision.feed_forward_length"]),
                           patches_per_tile=patches, tokens_per_tile=tokens)
    except KeyError:
        return None


# --- a minimal GGUF metadata reader (header key/values only; tensors are not read) ---------
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf(path: str | Path, skip_arrays_over: int = 64) -> tuple[dict, dict[str, int]]:
    """(key/values, {tensor name: bytes}) of a GGUF file (v2/v3), from its header alone.
    Long arrays (the vocabulary) are skipped and kept by length only, as a list of None.
    A tensor's bytes are the distance to the next tensor's data (or the file's end)."""
    path = Path(path)
    with open(path, "rb") as fh:
        def read(fmt):
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, fh.read(size))[0]

        def string():
            return fh.read(read("Q")).decode("utf-8", "replace")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                inner, count = read("I"), read("Q")
                items = [value(inner) for _ in range(count)]
                return items if count <= skip_arrays_over else [None] * count
            return read(_SCALARS[kind])

        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("I")  # version
        n_tensors, n_kv = read("Q"), read("Q")
        meta = {string(): value(read("I")) for _ in range(n_kv)}
        offsets = {}
        for _ in range(n_tensors):
            name = string()
            fh.read(8 * read("I") + 4)  # dims, type
            offsets[name] = read("Q")
        align = int(meta.get("general.alignment", 32))
        data_start = -(-fh.tell() // align) * align
    ends = sorted(offsets.values())[1:] + [path.stat().st_size - data_start]
    starts = sorted(offsets.values())
    size_at = dict(zip(starts, (e - s for s, e in zip(starts, ends, strict=True)), strict=True))
    return meta, {name: size_at[offset] for name, offset in offsets.items()}


def gguf_decode_bytes(tensors: dict[str, int]) -> int:
    """Bytes a decode step reads: every tensor but the token embeddings, which are looked up
    one row at a time, unless they double as the output matrix (tied: no output.weight)."""
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def decode_roofline(tok_s: float | None, weight_bytes: int, kv_bytes_per_token: int,
                    context: int, bandwidth_gbs: float | None) -> dict | None:
    """Bytes per decoded token at `context` cached tokens and the fraction of bandwidth used."""
    if not tok_s or not bandwidth_gbs:
        return None
    per_token = weight_bytes + kv_bytes_per_token * context
    return {"bytes_per_token": per_token, "context": context,
            "gbs": tok_s * per_token / 1e9, "fraction": tok_s * per_token / (bandwidth_gbs * 1e9)}


def compute_fraction(flops: float | None, seconds: float | None, peak_gflops: float | None) -> dict | None:
    if not flops or not seconds or not peak_gflops:
        return None
    return {"gflop": flops / 1e9, "gflops": flops / seconds / 1e9,
            "fraction": flops / seconds / (peak_gflops * 1e9)}
