"""`trained:<family>` reference models: the family's real architecture, scaled down (16
decoder layers), trained from scratch on the task set of `edgevlm.tasks`, shipped with the
package (fp16 safetensors, a few MB each) so that pruning can be judged by task accuracy.

`python -m edgevlm.trained.train --family smolvlm` rebuilds one (deterministic, resumable);
each folder's README.md is its model card.
"""

from __future__ import annotations

from pathlib import Path

from edgevlm.errors import ModelNotFoundError, UsageError
from edgevlm.registry import Registry, normalize
from edgevlm.tiny import Shape

ROOT = Path(__file__).resolve().parent

TEXT = dict(hidden=128, intermediate=384, heads=4, kv_heads=2, layers=16)

# family -> Shape of its reference model
RECIPES: Registry[Shape] = Registry("trained model family")
RECIPES.add("smolvlm", Shape(**TEXT, vision=dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
    image_size=48, patch_size=8)))
RECIPES.add("qwen2-vl", Shape(**TEXT, vision=dict(
    depth=4, embed_dim=64, num_heads=2, mlp_ratio=2, hidden_size=TEXT["hidden"])))


def trained_names() -> list[str]:
    return [f"trained:{name}" for name in RECIPES.names()]


def family_of(name: str) -> str:
    """'trained:smolvlm' -> 'smolvlm' (unknown names list the choices)."""
    key = normalize(name.removeprefix("trained:"))
    for family in RECIPES.names():
        if normalize(family) == key:
            return family
    raise UsageError(f"unknown trained model '{name}'", "available: " + ", ".join(trained_names()))


def folder(family: str) -> Path:
    return ROOT / family


def resolve_trained(name: str) -> Path:
    """The packaged checkpoint folder of a trained: model."""
    family = family_of(name)
    path = folder(family)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(
            f"the weights of trained:{family} are not in this installation ({path})",
            f"build them with: python -m edgevlm.trained.train --family {family}")
    return path
