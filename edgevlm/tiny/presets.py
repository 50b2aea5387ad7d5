"""`random:<preset>`: real VLM architectures with random weights.

Presets with a folder under real/ (Apache-2.0 models, see real/SOURCES.md) are built from the
model's own config.json, processor, tokenizer and chat-template files, which the checkpoint
folder keeps verbatim (`real_files`); the others keep the published sizes below with the tiny
family's tokenizer. Models above ~1B parameters are built in bfloat16 so that they fit in
memory on a laptop.
"""

from __future__ import annotations

from pathlib import Path

from edgevlm.registry import Registry
from edgevlm.tiny import Shape

REAL_ROOT = Path(__file__).parent / "real"
# preset -> folder of the real model's metadata files
REAL = {"smolvlm-256m": "SmolVLM-256M-Instruct", "qwen2-vl-2b": "Qwen2-VL-2B-Instruct"}
# Weights are written by transformers; everything else comes from the real folder verbatim.
NOT_COPIED = {"LICENSE", "SOURCES.md"}


def real_folder(preset: str) -> Path | None:
    """The real model's metadata folder for a preset name, or None."""
    from edgevlm.registry import normalize

    name = REAL.get(normalize(preset.removeprefix("random:")))
    return REAL_ROOT / name if name else None


def real_files(preset: str) -> list[Path]:
    """Files a materialized `random:` checkpoint takes verbatim from the real model."""
    folder = real_folder(preset)
    return sorted(f for f in folder.iterdir() if f.name not in NOT_COPIED) if folder else []


def build_real(preset: str, dtype: str):
    """(model, processor) from the real model's files: its config, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from edgevlm.adapters import adapter_for_config
    from edgevlm.processors import load_processor

    folder = real_folder(preset)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    return model, load_processor(folder, adapter_for_config(config))

PRESETS: Registry[tuple[str, Shape]] = Registry("random model preset")

SIGLIP_512 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=512, patch_size=16)

PRESETS.add("smolvlm-256m", ("smolvlm", Shape(
    hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, vocab=49280,
    vision=SIGLIP_512, config={"scale_factor": 4}, text={"tie_word_embeddings": False})))
PRESETS.add("smolvlm-500m", ("smolvlm", Shape(
    hidden=960, intermediate=2560, heads=15, kv_heads=5, layers=32, vocab=49280,
    vision=SIGLIP_512, config={"scale_factor": 4}, text={"tie_word_embeddings": False})))
PRESETS.add("qwen2-vl-2b", ("qwen2-vl", Shape(
    hidden=1536, intermediate=8960, heads=12, kv_heads=2, layers=28, vocab=151936,
    vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    text={"tie_word_embeddings": True}, dtype="bfloat16")))
PRESETS.add("qwen2.5-vl-3b", ("qwen2.5-vl", Shape(
    hidden=2048, intermediate=11008, heads=16, kv_heads=2, layers=36, vocab=151936,
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
    text={"tie_word_embeddings": True}, dtype="bfloat16")))
PRESETS.add("gemma3-4b", ("gemma3", Shape(
    hidden=2560, intermediate=10240, heads=8, kv_heads=4, layers=34, head_dim=256, vocab=262208,
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                num_attention_heads=16, image_size=896, patch_size=14),
    text={"sliding_window": 1024, "query_pre_attn_scalar": 256},
    config={"mm_tokens_per_image": 256}, dtype="bfloat16")))
PRESETS.add("llava-1.5-7b", ("llava", Shape(
    hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32064,
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    dtype="bfloat16")))


def preset_names() -> list[str]:
    return PRESETS.names()
