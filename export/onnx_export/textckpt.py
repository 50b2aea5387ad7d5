"""A text-only checkpoint folder that onnxruntime-genai's model builder accepts.

The builder reads a Hugging Face folder (config, weights and a tokenizer) of an architecture
it knows. We write one from the loaded PyTorch model rather than from the VLM's files, so the
key layout of the source checkpoint (hub-style, pruned, re-saved) never matters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Files the builder reads besides config and weights (tokenizer + generation settings).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


def builder_arch(vlm) -> str:
    """The builder architecture a family's text model is written as."""
    family = vlm.adapter.family
    text_type = vlm.config.get_text_config().model_type
    if family in ("qwen2-vl", "qwen2.5-vl"):
        # Qwen2-VL is not known to the builder, but its text model is a Qwen2.5-VL text model
        # (same M-RoPE); a plain Qwen2 extraction would lose M-RoPE.
        return "Qwen2_5_VLForConditionalGeneration"
    if family == "gemma3":
        return "Gemma3ForCausalLM"
    if text_type == "llama":
        return "LlamaForCausalLM"
    if text_type == "qwen2":
        return "Qwen2ForCausalLM"
    return ""


def write_text_checkpoint(vlm, src: Path, dest: Path) -> str:
    """Write `vlm`'s decoder (+ lm_head) as a builder-readable folder; returns its architecture."""
    import torch
    from safetensors.torch import save_file

    arch = builder_arch(vlm)
    dest.mkdir(parents=True, exist_ok=True)
    model, adapter = vlm.model, vlm.adapter
    text_cfg = vlm.config.get_text_config().to_dict()
    stack = {k: v for k, v in adapter.text_stack(model).state_dict().items()
             if not k.startswith("rotary_emb")}
    lm_head = adapter.lm_head_module(model).weight
    if arch == "Qwen2_5_VLForConditionalGeneration":
        tensors = {f"model.language_model.{k}": v for k, v in stack.items()}
        config = _qwen25_config(vlm, text_cfg)
    else:
        tensors = {f"model.{k}": v for k, v in stack.items()}
        config = dict(text_cfg, architectures=[arch])
        config.pop("dtype", None)
    tied = bool(config.get("tie_word_embeddings", False))
    if not tied:
        tensors["lm_head.weight"] = lm_head
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, dest / name)
    return arch


def _qwen25_config(vlm, text_cfg: dict) -> dict:
    """A Qwen2.5-VL config around the text model, with a minimal vision tower the builder
    instantiates (random, unused) but never exports."""
    cfg = vlm.config.to_dict()
    text = dict(text_cfg, model_type="qwen2_5_vl_text")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
                          "out_hidden_size": text["hidden_size"], "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "fullatt_block_indexes": [0], "window_size": 56},
        "image_token_id": cfg.get("image_token_id"),
        "video_token_id": cfg.get("video_token_id"),
        "vision_start_token_id": cfg.get("vision_start_token_id"),
        "vision_end_token_id": cfg.get("vision_end_token_id"),
        "tie_word_embeddings": bool(text_cfg.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
    }
