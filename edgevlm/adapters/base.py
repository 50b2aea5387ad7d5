"""ArchAdapter: a family's table entry (edgevlm.runtimes.families) plus module access."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from edgevlm.runtimes.families import Family


def get_path(root: Any, path: str) -> Any:
    """Resolve a dotted attribute path ('model.language_model.layers') on a module."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ArchAdapter(Family):
    """Where things live in one family's transformers model: the facts are the family
    table's (`Family`), this class adds what needs the model or torch."""

    lm_head: str = "lm_head"

    @classmethod
    def of(cls, spec: Family) -> ArchAdapter:
        return cls(**{f.name: getattr(spec, f.name) for f in fields(Family)})

    @property
    def family(self) -> str:
        """The family name (registry key), e.g. "qwen2-vl"."""
        return self.name

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
