"""Vision-tower layer removal (docs/methods.md section 8): which encoder layers may go, and
removing them so that the checkpoint stays standard for every family.

Layer indices are 0-based and refer to the ORIGINAL vision tower. What each family needs
besides the shorter ModuleList and the vision config's depth:
- Qwen2.5-VL: `fullatt_block_indexes` (blocks that attend over the whole image instead of
  windows) renumbered, and a plan that keeps them periodic, because llama.cpp only expresses
  "every n-th block is global" (clip.vision.n_wa_pattern).
- LLaVA: `vision_feature_layer` indexes the CLIP hidden states (0 = embeddings, -2 = the
  output of the second-to-last layer). It is renumbered so that it reads the same kept layer;
  removing the layer it reads is refused. Layers after it are dead weight (their output is
  never read), so plans remove them first.
"""

from __future__ import annotations

from edgevlm.errors import UsageError
from edgevlm.types import LayerScores, PrunePlan

VISION_PLAN_CONFIG_KEY = "edgevlm_vision_plan"

def vision_layers(adapter, model):
    """The vision encoder's layers (nn.ModuleList)."""
    from edgevlm.adapters import get_path

    return get_path(adapter.vision(model), adapter.vision_layers)


def vision_layers_owner(adapter, model):
    """The module holding the encoder's layer list, and the list's attribute name."""
    from edgevlm.adapters import get_path

    owner, _, name = adapter.vision_layers.rpartition(".")
    tower = adapter.vision(model)
    return (get_path(tower, owner) if owner else tower), name


def num_vision_layers(config) -> int:
    # Qwen's vision config maps num_hidden_layers onto `depth`; CLIP/SigLIP have it directly.
    return int(config.vision_config.num_hidden_layers)


# ------------------------------------------------------------------------- LLaVA features
def _feature_indices(config) -> list[int] | None:
    """LLaVA: the non-negative hidden-state indices the projector reads, else None."""
    layer = getattr(config, "vision_feature_layer", None)
    if layer is None:
        return None
    n = num_vision_layers(config)
    return [i % (n + 1) for i in (layer if isinstance(layer, (list, tuple)) else [layer])]


def read_layers(config) -> list[int]:
    """Vision layers whose output the projector reads directly (LLaVA's feature layers)."""
    return sorted({h - 1 for h in _feature_indices(config) or [] if h > 0})


def dead_layers(config) -> list[int]:
    """Layers whose output nothing reads (LLaVA: after the last feature layer)."""
    indices = _feature_indices(config)
    if indices is None:
        return []
    return list(range(max(indices), num_vision_layers(config)))


def _remap_feature_layer(config, kept: list[int]):
    """vision_feature_layer for the kept layers, same sign convention as the original."""
    layer = config.vision_feature_layer
    n_old, n_new = num_vision_layers(config), len(kept)
    out = []
    for original in (layer if isinstance(layer, (list, tuple)) else [layer]):
        h = original % (n_old + 1)
        new_h = sum(1 for k in kept if k < h)  # hidden state after the last kept layer < h
        out.append(new_h - (n_new + 1) if original < 0 else new_h)
    return out if isinstance(layer, (list, tuple)) else out[0]


# ----------------------------------------------------------------- Qwen2.5-VL full attention
def window_pattern(config) -> tuple[list[str] | None, int | None]:
    """Qwen2.5-VL: per-block attention kind and its period (full every n-th block)."""
    full = getattr(config.vision_config, "fullatt_block_indexes", None)
    if not full:
        return None, None
    n = num_vision_layers(config)
    types = ["full" if i in set(full) else "window" for i in range(n)]
    period = sorted(full)[0] + 1
    periodic = sorted(full) == [i for i in range(n) if (i + 1) % period == 0]
    return types, (period if periodic else None)


# ---------------------------------------------------------------------------------- plans
def make_vision_plan(scores: LayerScores, config, *, ratio=None, n_layers=None,
                     protect=None) -> PrunePlan:
    """Drop the lowest-scored vision layers (one-shot), never one the projector reads, dead
    layers first, and for Qwen2.5-VL keeping the full-attention period."""
    from edgevlm.plan import make_plan, parse_protect

    n = num_vision_layers(config)
    if scores.n_layers != n:
        raise UsageError(f"vision scores are for {scores.n_layers} layers, the tower has {n}",
                         "score the unpruned model the plan is for")
    protected = sorted(set(parse_protect(protect, n)) | set(read_layers(config)))
    dead = set(dead_layers(config))
    # Dead layers cost time and change nothing: below every real score (BI, KL >= 0).
    ordering = LayerScores(scores.method, [-1.0 if i in dead else s
                                           for i, s in enumerate(scores.scores)])
    types, period = window_pattern(config)
    plan = make_plan(ordering, ratio=ratio, n_layers=n_layers, protect=protected,
                     layer_types=types, layer_period=period)
    plan.scores = list(scores.scores)
    return plan


# -------------------------------------------------------------------------------- pruning
def prune_vision_(vlm, plan: PrunePlan) -> None:
    """Drop `plan.layers` from the vision tower of `vlm`, in place, keeping the config
    consistent (depth, Qwen2.5-VL full-attention blocks, LLaVA feature layer)."""
    import torch

    plan.validate()
    adapter, model, config = vlm.adapter, vlm.model, vlm.model.config
    n = num_vision_layers(config)
    if plan.n_layers != n:
        raise UsageError(f"vision plan is for {plan.n_layers} layers, the tower has {n}",
                         "make the vision plan on the unpruned model it is applied to")
    if plan.mode != "drop":
        raise UsageError("vision plans only drop layers", "use a plan with mode 'drop'")
    read = sorted(set(read_layers(config)) & set(plan.layers))
    if read:
        raise UsageError(
            f"vision layer(s) {read} produce the features the projector reads "
            f"(vision_feature_layer={config.vision_feature_layer}); removing them would change "
            "what the projector was trained on", "keep those layers (plans made by edgevlm do)")
    kept = plan.kept
    owner, name = vision_layers_owner(adapter, model)
    old = getattr(owner, name)
    setattr(owner, name, torch.nn.ModuleList([old[i] for i in kept]))
    for new_idx, layer in enumerate(getattr(owner, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    if getattr(config, "vision_feature_layer", None) is not None:
        config.vision_feature_layer = _remap_feature_layer(config, kept)
    vcfg = config.vision_config
    full = getattr(vcfg, "fullatt_block_indexes", None)
    if full:
        remapped = [kept.index(i) for i in full if i in kept]
        vcfg.fullatt_block_indexes = remapped
        # The Qwen2.5-VL tower copies the list at construction; keep the module in step.
        adapter.vision(model).fullatt_block_indexes = remapped
    vcfg.num_hidden_layers = len(kept)
    setattr(config, VISION_PLAN_CONFIG_KEY, plan.to_dict())  # the same schema as edgevlm_plan
