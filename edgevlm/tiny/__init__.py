"""Built-in random models, made in-process with an offline tokenizer and a working
processor, so tests, demos and benchmarks never touch a model hub.

- `tiny:<family>`: 8 decoder layers, hidden 64 (Gemma 3: 12 layers, so whole
  local/global periods can be removed); `tiny:<family>-k256`: hidden 256 / FFN 512, row
  sizes that llama.cpp K-quants accept.
- `random:<preset>`: the public architecture sizes of real models (see presets.py) with
  random weights: speed and memory on a device before downloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgevlm.errors import UsageError
from edgevlm.registry import Registry, normalize


@dataclass(frozen=True)
class Shape:
    """Sizes of a built-in model. `layers=None` takes the family default; `vision`, `text`
    and `config` override the family's vision-config, text-config and top-level defaults."""

    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    layers: int | None = None
    head_dim: int | None = None
    vocab: int | None = None  # None: exactly the offline tokenizer's size
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    dtype: str = "float32"

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads


VARIANTS = {"": Shape(), "k256": Shape(hidden=256, intermediate=512)}

# family name -> build(shape, seed) -> (model, processor)
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


def resolve_builtin(name: str) -> tuple[str, Shape, str]:
    """(family, shape, label) for a 'tiny:...' or 'random:...' name."""
    if name.startswith("random:"):
        from edgevlm.tiny.presets import PRESETS

        family, shape = PRESETS.get(name.removeprefix("random:"))
        return family, shape, "random-" + normalize(name.removeprefix("random:"))
    family, variant = parse_tiny(name)
    return family, VARIANTS[variant], family + (f"-{variant}" if variant else "")


def build_tiny(name: str, seed: int = 0):
    """Build (model, processor) for a tiny: or random: name, seeded and deterministic."""
    import torch

    if not name.startswith("random:"):
        name = "tiny:" + name.removeprefix("tiny:")
    family, shape, _ = resolve_builtin(name)
    torch.manual_seed(seed)
    from edgevlm.tiny.presets import build_real, real_folder

    if name.startswith("random:") and real_folder(name):
        model, processor = build_real(name, shape.dtype)
    else:
        model, processor = FACTORIES.get(family)(shape, seed)
    model.eval()
    return model, processor


from edgevlm.tiny import gemma3, llava, qwen2_vl, smolvlm  # noqa: E402,F401  (register)
