"""`tiny:<family>` models: small seeded random VLMs built in-process, with an offline
tokenizer and a working processor, so tests and demos never touch a model hub.

Names: `tiny:<family>` (8 decoder layers, hidden 64; Gemma 3 has 12 so that whole
local/global periods can be removed) and `tiny:<family>-k256` (hidden 256, FFN 512:
row sizes that llama.cpp K-quants accept).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import UsageError
from edgevlm.registry import Registry, normalize


@dataclass(frozen=True)
class TinySize:
    """Text-model shape of a tiny variant."""

    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    layers: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


VARIANTS = {"": TinySize(), "k256": TinySize(hidden=256, intermediate=512)}

# family name -> build(size, seed) -> (model, processor)
FACTORIES: Registry = Registry("tiny model family")


def tiny_names() -> list[str]:
    """Every accepted tiny model name (without the 'tiny:' prefix)."""
    return [f"{family}{'-' + v if v else ''}" for family in FACTORIES.names() for v in VARIANTS]


def parse_tiny(name: str) -> tuple[str, str]:
    """'qwen2.5-vl-k256' -> ('qwen2.5-vl', 'k256'); unknown names list the choices."""
    key = normalize(name.removeprefix("tiny:"))
    for family in FACTORIES.names():
        for variant in VARIANTS:
            if key == normalize(f"{family}{'-' + variant if variant else ''}"):
                return family, variant
    raise UsageError(
        f"unknown tiny model 'tiny:{name.removeprefix('tiny:')}'",
        "available: " + ", ".join(f"tiny:{n}" for n in tiny_names()),
    )


def build_tiny(name: str, seed: int = 0):
    """Build (model, processor) for a tiny model name, seeded and deterministic."""
    import torch

    family, variant = parse_tiny(name)
    torch.manual_seed(seed)
    model, processor = FACTORIES.get(family)(VARIANTS[variant], seed)
    model.eval()
    return model, processor


from edgevlm.tiny import gemma3, llava, qwen2_vl, smolvlm  # noqa: E402,F401  (register)
