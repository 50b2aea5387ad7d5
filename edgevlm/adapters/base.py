"""ArchAdapter: what edgevlm needs to know about one VLM family, mostly as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def get_path(root: Any, path: str) -> Any:
    """Resolve a dotted attribute path ('model.language_model.layers') on a module."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ArchAdapter:
    """Where things live in one family's transformers model, and how it exports.

    Paths are dotted attribute paths from the top-level *ForConditionalGeneration module.
    """

    family: str  # registry name, e.g. "qwen2-vl"
    model_types: tuple[str, ...]  # config.model_type values this adapter handles
    hf_class: str  # transformers class name
    text_model: str  # decoder stack owner (has .layers, .norm, .embed_tokens)
    vision_tower: str
    projector: str
    lm_head: str = "lm_head"
    image_token_keys: tuple[str, ...] = ("image_token_id",)  # config attrs holding image token ids
    per_layer_config_keys: tuple[str, ...] = ("layer_types",)  # text-config lists sliced on prune
    processor_class: str = ""  # processor class name written to processor_config.json
    layer_period: int | None = None  # local/global attention period that pruning must keep
    gguf_text_arch: str | None = None
    gguf_projector: str | None = None
    targets: tuple[str, ...] = ("onnx", "gguf")
    notes: str = ""
    extra: dict = field(default_factory=dict)

    # --- module access -------------------------------------------------------------
    def layers(self, model):
        """The decoder layers (nn.ModuleList)."""
        return get_path(model, self.text_model).layers

    def text_stack(self, model):
        return get_path(model, self.text_model)

    def final_norm(self, model):
        return get_path(model, self.text_model).norm

    def embed_tokens(self, model):
        return get_path(model, self.text_model).embed_tokens

    def vision(self, model):
        return get_path(model, self.vision_tower)

    def projector_module(self, model):
        return get_path(model, self.projector)

    def lm_head_module(self, model):
        return get_path(model, self.lm_head)

    def text_config(self, config):
        return config.get_text_config()

    # --- tokens --------------------------------------------------------------------
    def image_token_ids(self, config) -> list[int]:
        """Ids of the tokens that carry image features in input_ids."""
        ids = (getattr(config, key, None) for key in self.image_token_keys)
        return sorted({int(i) for i in ids if i is not None})

    def visual_mask(self, input_ids, config):
        """Boolean (batch, seq) mask of visual-token positions for a batch of input_ids."""
        import torch

        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.image_token_ids(config):
            mask |= input_ids == token_id
        return mask

    def num_layers(self, config) -> int:
        return int(config.get_text_config().num_hidden_layers)
