"""Angular distance over blocks of n layers (Gromov et al., arXiv 2403.17887).

d(l, n) = arccos(cos(x_l, x_{l+n})) / pi on each sample's last prompt token, averaged over
samples, where x_l is the input of layer l (x_L the output of the last layer, before the
final norm). Removing layers l..l+n-1 costs least where d(l, n) is smallest.

Per-layer scores (for plans that rank single layers): layer i gets the smallest d(l, n)
over the blocks that contain it, so the layers of the best block share the lowest score
and a layer scores low only if some removable block contains it. The plan should still
take the contiguous block from `extra["block_distances"]` (index l = block l..l+n-1).
"""

from __future__ import annotations

import math

from edgevlm.errors import UsageError
from edgevlm.scoring.base import Scorer, register
from edgevlm.scoring.hooks import capture_blocks, forward


def run_angular(vlm, batches, n_layers: int, n: int = 1) -> tuple[list[float], dict]:
    import torch

    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= n_layers:
        raise UsageError(f"angular block size n={n!r} is not a whole number in 1..{n_layers} (the "
                         f"model has {n_layers} decoder layers)",
                         f"use an n-layers value between 1 and {n_layers}")
    total = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    count = 0
    for batch in batches:
        unit = torch.nn.functional.normalize(_last_token_states(vlm, batch, n_layers), dim=-1)
        cos = (unit @ unit.transpose(1, 2)).clamp(-1.0, 1.0)  # (batch, L+1, L+1), tiny
        total += (torch.arccos(cos) / math.pi).sum(0).cpu()
        count += batch.size
    pairwise = total / count
    blocks = [float(pairwise[start, start + n]) for start in range(n_layers - n + 1)]
    scores = [min(blocks[max(0, i - n + 1):min(i, n_layers - n) + 1]) for i in range(n_layers)]
    best = min(range(len(blocks)), key=lambda start: (blocks[start], start))
    extra = {"n": n, "block_distances": blocks, "best_block": list(range(best, best + n)),
             "pairwise_distances": [[float(v) for v in row] for row in pairwise]}
    return scores, extra


def _last_token_states(vlm, batch, n_layers: int):
    """x_0..x_L at each row's last real token: (batch, L+1, hidden), float64."""
    import torch

    states: list = [None] * (n_layers + 1)

    def pick(x):
        rows = torch.arange(batch.size, device=x.device)
        return x[rows, batch.last.to(x.device)].to(batch.last.device)

    def on_block(index, x_in, x_out):
        states[index] = pick(x_in)
        states[index + 1] = pick(x_out)

    with capture_blocks(vlm, on_block):
        forward(vlm, batch)
    return torch.stack(states, dim=1).double()


register(Scorer(
    name="angular",
    summary="angular distance between the last token's states n layers apart (contiguous block)",
    run=run_angular,
    defaults={"n": 1},
    paper="Gromov et al., arXiv 2403.17887",
))
