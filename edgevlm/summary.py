"""`edgevlm inspect`: what a model is made of, without loading its weights."""

from __future__ import annotations

from edgevlm.adapters import adapter_for_config
from edgevlm.targets import TARGETS


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def describe(name: str, seed: int = 0) -> dict:
    """Family, layer counts, parameters per part, image tokens per image, targets; the family
    facts (class, targets, notes, known defects) are the family table's, via the adapter."""
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText

    from edgevlm.loader import _check_processor_files, resolve
    from edgevlm.processors import load_processor
    from edgevlm.prompting import chat_batch, chat_text

    path = resolve(name, seed=seed)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    adapter = adapter_for_config(config)
    with torch.device("meta"):  # shapes only: no memory, no weight loading
        model = AutoModelForImageTextToText.from_config(config)
    text = adapter.text_stack(model)
    embed = _count(adapter.embed_tokens(model))
    lm_head = adapter.lm_head_module(model)
    tied = lm_head.weight is adapter.embed_tokens(model).weight
    parts = {
        "vision": _count(adapter.vision(model)) - _projector_inside_vision(adapter, model),
        "projector": _count(adapter.projector_module(model)),
        "decoder": _count(text.layers) + _count(adapter.final_norm(model)),
        "embeddings": embed,
        "lm_head": 0 if tied else _count(lm_head),
    }
    _check_processor_files(path)
    processor = load_processor(path, adapter)
    image = Image.new("RGB", (384, 384), (128, 128, 128))
    batch = chat_batch(processor, [chat_text(processor, "Describe.")], [[image]], return_tensors="pt")
    image_tokens = int(adapter.visual_mask(batch["input_ids"], config).sum())
    text_config = config.get_text_config()
    plan = getattr(config, "edgevlm_plan", None)
    return {
        "model": name,
        "path": str(path),
        "family": adapter.family,
        "architecture": (config.architectures or [adapter.hf_class])[0],
        "decoder_layers": int(text_config.num_hidden_layers),
        "hidden_size": int(text_config.hidden_size),
        "layer_types": sorted(set(getattr(text_config, "layer_types", None) or ["full_attention"])),
        "parameters": parts,
        "total_parameters": sum(parts.values()),
        "tied_embeddings": bool(tied),
        "image_tokens_per_384px_image": image_tokens,
        "image_token_ids": adapter.image_token_ids(config),
        "targets": [t for t in adapter.targets if t in TARGETS],
        "pruned": plan,
        "notes": adapter.notes,
        "known_defects": dict(adapter.known_defects),
    }


def _projector_inside_vision(adapter, model) -> int:
    """Qwen2-VL's merger lives inside the vision tower: count it once, as projector."""
    return _count(adapter.projector_module(model)) if adapter.projector.startswith(
        adapter.vision_tower + ".") else 0


def format_summary(info: dict) -> str:
    params = info["parameters"]
    lines = [
        f"model            {info['model']}",
        f"family           {info['family']} ({info['architecture']})",
        f"decoder layers   {info['decoder_layers']} (hidden {info['hidden_size']}, "
        f"{', '.join(info['layer_types'])})",
        "parameters       " + ", ".join(f"{k} {_human(v)}" for k, v in params.items())
        + f"; total {_human(info['total_parameters'])}"
        + (" (lm_head tied to embeddings)" if info["tied_embeddings"] else ""),
        f"image tokens     {info['image_tokens_per_384px_image']} per 384x384 image",
        f"targets          {', '.join(info['targets'])}",
    ]
    if info["pruned"]:
        p = info["pruned"]
        lines.append(f"pruned           {p.get('method')}: dropped {p.get('layers')} "
                     f"of {p.get('n_layers')} layers")
    if info["notes"]:
        lines.append(f"notes            {info['notes']}")
    for target, defect in (info.get("known_defects") or {}).items():
        lines.append(f"known defect     {target}: {defect}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
