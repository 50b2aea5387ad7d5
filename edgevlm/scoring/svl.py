"""SVL — Short-LVLM's token-selective BI (arXiv 2507.23362, method figure; code unreleased).

For each layer, the attention map of that layer (eager attention, mean over heads) gives
token importance; BI of that layer is then computed on the important tokens only.

Token importance, per sample (docs/methods.md section 3; V = visual tokens, T = text tokens,
padding excluded; A[q, k] = attention query q pays to key k, causal so A[q, k] = 0 for k > q):
- visual token j: mean of  mean_{q in V, q >= j} A[q, j]  and  mean_{q in T, q >= j} A[q, j]
- text token i:   mean of  mean_{k in V, k <= i} A[i, k]  and  mean_{q in T, q >= i} A[q, i]
Each mean counts only the causally possible partners (a term with none is 0). The two raw
terms are averaged first, then normalised to sum 1 within the modality. Then the top
ceil(p * |V|) visual and ceil(p * |T|) text tokens are kept (p = fraction per modality,
default 0.5; ties broken by position).
"""

from __future__ import annotations

import math

from edgevlm.errors import UsageError
from edgevlm.scoring.base import Scorer, register
from edgevlm.scoring.bi import CosineStats
from edgevlm.scoring.hooks import capture_blocks, eager_attention, forward


def _normalise(values, mask):
    import torch

    values = values * mask
    total = values.sum(-1, keepdim=True)
    return torch.where(total > 0, values / total.clamp(min=1e-30), values)


def _mean(total, count):
    import torch

    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def token_importance(attn, visual, text):
    """Importance (batch x seq) of each token within its modality from a head-averaged
    attention map (batch x seq x seq, rows = queries); zero outside `visual | text`."""
    v, t = visual.float(), text.float()
    v_after = v.flip(-1).cumsum(-1).flip(-1)  # visual queries at or after each position
    t_after = t.flip(-1).cumsum(-1).flip(-1)
    v_upto = v.cumsum(-1)  # visual keys at or before each position
    received_from_v = _mean((attn * v.unsqueeze(-1)).sum(1), v_after)  # column sums
    received_from_t = _mean((attn * t.unsqueeze(-1)).sum(1), t_after)
    paid_to_v = _mean((attn * v.unsqueeze(1)).sum(2), v_upto)  # row sums over visual keys
    vis = _normalise((received_from_v + received_from_t) / 2, v)
    txt = _normalise((paid_to_v + received_from_t) / 2, t)
    return vis * v + txt * t


def top_p_mask(importance, visual, text, p: float):
    """Keep the top ceil(p * n) tokens of each modality, per row."""
    import torch

    keep = torch.zeros_like(visual)
    for modality in (visual, text):
        for row in range(importance.shape[0]):
            idx = modality[row].nonzero().squeeze(-1)
            k = math.ceil(p * len(idx))
            if k:
                # stable sort on -importance: ties keep the earlier position
                order = torch.sort(-importance[row, idx], stable=True).indices[:k]
                keep[row, idx[order]] = True
    return keep


def run_svl(vlm, batches, n_layers: int, p: float = 0.5) -> tuple[list[float], dict]:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise UsageError(f"SVL token fraction p={p!r} must be in (0, 1]", "use e.g. p=0.5")
    stats = CosineStats(n_layers)
    kept_total = [0] * n_layers
    for batch in batches:
        _score_batch(vlm, batch, p, stats, kept_total)
    return stats.block_influence("important tokens"), {"p": p, "kept_tokens": kept_total}


def _score_batch(vlm, batch, p: float, stats: CosineStats, kept_total: list[int]) -> None:
    """One eager forward: layer i's attention hook picks its tokens, its block hook adds
    their cosines (the attention module finishes before the layer's output hook fires)."""
    visual, text = batch.tokens("visual"), batch.tokens("text")
    keep: dict[int, object] = {}

    def on_attention(index, out):
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if weights is None:
            raise UsageError("the attention module returned no attention weights",
                             "SVL needs eager attention; load the model with attn_implementation='eager'")
        attn = weights.float().mean(1).to(visual.device)
        keep[index] = top_p_mask(token_importance(attn, visual, text), visual, text, p)

    def on_block(index, x_in, x_out):
        mask = keep.pop(index)
        stats.add(index, x_in, x_out, mask)
        kept_total[index] += int(mask.sum())

    handles = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: on_attention(i, o))
               for i, layer in enumerate(vlm.adapter.layers(vlm.model))]
    try:
        with eager_attention(vlm), capture_blocks(vlm, on_block):
            forward(vlm, batch)
    finally:
        for handle in handles:
            handle.remove()


register(Scorer(
    name="svl",
    summary="Short-LVLM: BI on the tokens that attention maps mark important (top-p per modality)",
    run=run_svl,
    defaults={"p": 0.5},
    paper="Short-LVLM, arXiv 2507.23362",
))
