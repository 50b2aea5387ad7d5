"""Vision-tower layer scores (docs/methods.md section 8). HIGHER = MORE important.

- `bi`: Block Influence of each vision layer, 1 - mean cosine(layer input, layer output) in
  fp32 over the patch tokens: padding patches (SmolVLM's patch_attention_mask) and CLIP's
  class token (LLaVA drops it before the projector) are excluded.
- `kl`: end to end, KL(P_skipped || P_original) of the VLM's next-token distribution at the
  last prompt position when that one vision layer is skipped (its output replaced by its
  input). One whole-model forward per vision layer and batch: the decoder dominates its cost.

Vision scores are LayerScores like decoder scores, with method "vision-bi" / "vision-kl", and
are cached the same way (edgevlm.scoring.cache).
"""

from __future__ import annotations

import contextlib

from edgevlm.registry import Registry
from edgevlm.scoring.base import Scorer
from edgevlm.scoring.bi import CosineStats
from edgevlm.scoring.hooks import _hidden, _output, forward
from edgevlm.scoring.lc import kl
from edgevlm.types import LayerScores

VISION_SCORERS: Registry[Scorer] = Registry("vision scoring method")
PREFIX = "vision-"


@contextlib.contextmanager
def _patch_masks(vlm):
    """Yields a dict whose 'mask' is the latest vision forward's patch mask (or None):
    SmolVLM passes patch_attention_mask (tiles x rows x cols) to its vision transformer."""
    state = {"mask": None}
    tower = vlm.adapter.vision(vlm.model)

    def pre(module, args, kwargs):
        mask = kwargs.get("patch_attention_mask")
        state["mask"] = None if mask is None else mask.reshape(mask.shape[0], -1).bool()

    handle = tower.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def _token_mask(vlm, hidden, patch_mask):
    """Boolean mask of the patch tokens in a vision layer's hidden states."""
    import torch

    mask = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
    if patch_mask is not None and hidden.dim() == 3 and patch_mask.shape == mask.shape:
        mask &= patch_mask.to(mask.device)
    if vlm.adapter.family == "llava" and hidden.dim() == 3:
        mask[:, 0] = False  # CLIP's class token: not a patch, dropped before the projector
    return mask


def run_vision_bi(vlm, batches, n_layers: int):
    from edgevlm.vision_prune import vision_layers

    stats = CosineStats(n_layers)
    layers = vision_layers(vlm.adapter, vlm.model)
    with _patch_masks(vlm) as state:
        def hook(module, args, kwargs, out, index):
            x_in, x_out = _hidden(args, kwargs).float(), _output(out).float()
            stats.add(index, x_in, x_out, _token_mask(vlm, x_in, state["mask"]))

        handles = [layer.register_forward_hook(
            lambda m, a, k, o, i=i: hook(m, a, k, o, i), with_kwargs=True)
            for i, layer in enumerate(layers)]
        try:
            for batch in batches:
                forward(vlm, batch)
        finally:
            for handle in handles:
                handle.remove()
    return stats.block_influence("patch tokens"), {"tokens_counted": stats.counts[0]}


@contextlib.contextmanager
def skip_layer(layer):
    """Make `layer` return its input unchanged (same output structure)."""
    def hook(module, args, kwargs, out):
        hidden = _hidden(args, kwargs)
        return (hidden, *out[1:]) if isinstance(out, (tuple, list)) else hidden

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _next_token_logprobs(vlm, batch):
    import torch

    # iter_batches left-pads, so the last position is every row's last prompt token.
    logits = forward(vlm, batch).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def run_vision_kl(vlm, batches, n_layers: int):
    import torch

    from edgevlm.vision_prune import vision_layers

    layers = vision_layers(vlm.adapter, vlm.model)
    totals = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    for batch in batches:
        original = _next_token_logprobs(vlm, batch)
        for i, layer in enumerate(layers):
            with skip_layer(layer):
                totals[i] += kl(_next_token_logprobs(vlm, batch), original).sum().cpu()
        count += batch.size
    return (totals / count).tolist(), {}


def _register(scorer: Scorer) -> None:
    VISION_SCORERS.add(scorer.name, scorer)


_register(Scorer(name="bi", summary="BI of each vision layer over patch tokens (fp32, no padding)",
                 run=run_vision_bi))
_register(Scorer(name="kl", summary="KL of the next-token distribution when a vision layer is skipped",
                 run=run_vision_kl))


def score_vision(vlm, samples, method: str = "bi", *, batch_size: int = 4, progress: bool = True,
                 calibration: dict | None = None, use_cache: bool = True) -> LayerScores:
    """Score every vision layer of `vlm` (cached per model + method + calibration samples)."""
    from edgevlm.scoring import _run
    from edgevlm.scoring.cache import STATS, cache_file, cache_key, calibration_info, load_matching
    from edgevlm.vision_prune import num_vision_layers

    scorer = VISION_SCORERS.get(method)
    name = PREFIX + scorer.name
    samples = list(samples)
    info = calibration_info(samples, calibration)
    key = cache_key(name, {}, vlm.fingerprint(), info["fingerprint"])
    if use_cache:
        found = load_matching(cache_file(key), key)
        if found is not None:
            STATS["reused"] += 1
            return found
    result = _run(vlm, samples, scorer, {}, {}, info, batch_size, progress,
                  n_layers=num_vision_layers(vlm.config), label=name)
    STATS["computed"] += 1
    if use_cache:
        result.save(cache_file(key))
    return result
