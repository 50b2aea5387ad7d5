"""BI — Block Influence (ShortGPT, arXiv 2403.03853): 1 - mean token cosine(input, output)."""

from __future__ import annotations

from edgevlm.errors import CalibrationError
from edgevlm.scoring.base import Scorer, register
from edgevlm.scoring.hooks import TOKEN_SUBSETS, capture_blocks, forward


def row_cosine(x_in, x_out):
    """Row-wise cosine in fp32 (never an N x N matrix). A row where either vector is zero
    has no defined cosine: it counts as 0.5, the ShortGPT reference code's value for its NaN
    (docs/methods.md section 1). F.cosine_similarity would return 0 there (it clamps the
    norm product), so zero rows are found explicitly."""
    import torch

    x_in, x_out = x_in.float(), x_out.float()
    dot = (x_in * x_out).sum(-1)
    norms = torch.linalg.vector_norm(x_in, dim=-1) * torch.linalg.vector_norm(x_out, dim=-1)
    defined = norms > 0
    cos = torch.where(defined, dot / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.5)
    return cos.clamp(-1.0, 1.0)


class CosineStats:
    """Per-layer running sum and count of token cosines between block input and output.

    Memory is O(layers): each batch's hidden states are reduced as soon as the hook sees them.
    """

    def __init__(self, n_layers: int):
        self.sums = [0.0] * n_layers
        self.counts = [0] * n_layers

    def add(self, index: int, x_in, x_out, mask) -> None:
        cos = row_cosine(x_in, x_out)
        mask = mask.to(cos.device)  # layers may sit on other devices (device_map)
        self.sums[index] += float(cos[mask].double().sum())
        self.counts[index] += int(mask.sum())

    def block_influence(self, what: str) -> list[float]:
        empty = [i for i, n in enumerate(self.counts) if n == 0]
        if empty:
            raise CalibrationError(f"no {what} in the calibration batches: cannot score layers {empty}",
                                   "use calibration samples with images, or another --tokens subset")
        return [1.0 - s / n for s, n in zip(self.sums, self.counts, strict=True)]


def run_bi(vlm, batches, n_layers: int, tokens: str = "all") -> tuple[list[float], dict]:
    """BI per layer over the chosen token subset (padding excluded). Also reports the other
    subsets in `extra`, as they cost nothing more."""
    stats = {subset: CosineStats(n_layers) for subset in TOKEN_SUBSETS}
    for batch in batches:
        _accumulate(vlm, batch, stats)
    scores = stats[tokens].block_influence(f"{tokens} tokens")
    extra = {"tokens_counted": stats[tokens].counts[0], "by_tokens": {}}
    for subset, stat in stats.items():
        if all(stat.counts):
            extra["by_tokens"][subset] = stat.block_influence(subset)
    return scores, extra


def _accumulate(vlm, batch, stats: dict) -> None:
    masks = {subset: batch.tokens(subset) for subset in stats}

    def on_block(index, x_in, x_out):
        for subset, stat in stats.items():
            stat.add(index, x_in, x_out, masks[subset])

    with capture_blocks(vlm, on_block):
        forward(vlm, batch)


register(Scorer(
    name="bi",
    summary="Block Influence: 1 - cosine(block input, block output), mean over tokens",
    run=run_bi,
    defaults={"tokens": "all"},
    choices={"tokens": TOKEN_SUBSETS},
    paper="ShortGPT, arXiv 2403.03853",
))
