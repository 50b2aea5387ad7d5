"""Pieces shared by the built-in model factories."""

from __future__ import annotations


def text_kwargs(shape, tokenizer, default_layers: int = 8, **defaults) -> dict:
    """Text-config keyword arguments: family defaults, then the shape's sizes and overrides."""
    return {
        **defaults,
        "vocab_size": shape.vocab or len(tokenizer),
        **special_ids(tokenizer),
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers or default_layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.dim_per_head,
        "max_position_embeddings": defaults.get("max_position_embeddings", 4096),
        **shape.text,
    }


def token_ids(tokenizer, **names: str) -> dict[str, int]:
    """{config_key: id} for the given {config_key: token string}."""
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def special_ids(tokenizer) -> dict[str, int | None]:
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config, dtype: str = "float32"):
    """Instantiate the family model from its config (weights from the current torch seed)."""
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
