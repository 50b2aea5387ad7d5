"""prune_(): remove decoder layers in place so the result saves as a stock checkpoint."""

from __future__ import annotations

from pathlib import Path

from edgevlm.plan import PLAN_CONFIG_KEY
from edgevlm.types import PrunePlan


def prune_(vlm, plan: PrunePlan) -> None:
    """Drop `plan.layers` from the decoder of `vlm` (a LoadedVLM), in place.

    Besides the ModuleList this renumbers `layer_idx` everywhere (else the KV cache mixes
    layers), sets `num_hidden_layers` on the text config (else reload silently
    random-initialises missing layers) and slices every per-layer config list.
    """
    import torch

    plan.validate()
    adapter, model = vlm.adapter, vlm.model
    layers = adapter.layers(model)
    text_config = model.config.get_text_config()
    if len(layers) != plan.n_layers:
        from edgevlm.errors import UsageError

        raise UsageError(f"plan is for {plan.n_layers} layers, the model has {len(layers)}",
                         "make the plan on the unpruned model it is applied to")
    if plan.mode != "drop":
        from edgevlm.errors import UsageError

        raise UsageError(f"plan mode '{plan.mode}' changes the graph, not the checkpoint",
                         "apply freeze plans at export time (ONNX target)")
    from edgevlm.plan import check_period

    check_period(plan.layers, getattr(text_config, "layer_types", None), adapter.layer_period)
    kept = plan.kept
    stack = adapter.text_stack(model)
    stack.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(stack.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    _slice_config(text_config, kept, plan.n_layers, adapter.per_layer_config_keys)
    # The plan itself (PrunePlan's JSON form): the manifest and every reader take it as is.
    setattr(model.config, PLAN_CONFIG_KEY, plan.to_dict())


def _slice_config(text_config, kept: list[int], n_total: int, keys) -> None:
    text_config.num_hidden_layers = len(kept)
    for key, value in list(vars(text_config).items()):
        per_layer = key in keys or ("layer" in key and not key.startswith("_"))
        if per_layer and isinstance(value, (list, tuple)) and len(value) == n_total:
            setattr(text_config, key, type(value)(value[i] for i in kept))
    # Qwen2: layers >= max_window_layers use sliding windows; keep the cap in range.
    if isinstance(getattr(text_config, "max_window_layers", None), int):
        text_config.max_window_layers = min(text_config.max_window_layers, len(kept))


def save_pruned(vlm, out_dir: Path) -> Path:
    """save_pretrained model + processor (tokenizer, chat template) into out_dir."""
    out_dir = Path(out_dir)
    vlm.model.save_pretrained(out_dir)
    vlm.processor.save_pretrained(out_dir)
    gen = getattr(vlm.model, "generation_config", None)
    if gen is not None and not (out_dir / "generation_config.json").exists():
        gen.save_pretrained(out_dir)
    return out_dir
