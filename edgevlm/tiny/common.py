"""Pieces shared by the tiny-model factories."""

from __future__ import annotations


def text_kwargs(size, tokenizer, **extra) -> dict:
    """Text-config keyword arguments common to every family."""
    return dict(
        vocab_size=len(tokenizer),
        **special_ids(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim,
        max_position_embeddings=4096,
        **extra,
    )


def token_ids(tokenizer, **names: str) -> dict[str, int]:
    """{config_key: id} for the given {config_key: token string}."""
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def special_ids(tokenizer) -> dict[str, int | None]:
    return dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config):
    """Instantiate the family model from its config (weights from the current torch seed)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_config(config).float()
