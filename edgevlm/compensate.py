"""Subspace-compensated layer removal (Short-LVLM's training-free fix, docs/methods.md section 3).

Removing a contiguous block of decoder layers deletes the residual update it added: the gap
H = X_out(block) - X_in(block), one row per calibration token. Most of that gap lies in a few
directions, the top-k right singular vectors V_k of H. The retained layer just before the
block writes into the residual stream through its MLP down-projection W (y = W x, nn.Linear),
so amplifying W's output along those directions, W' = (I + V_k V_kᵀ) W, puts back part of
what the block used to add, without any training.

V_k is taken from the Gram matrix HᵀH (hidden x hidden, accumulated over batches in float64):
its top-k eigenvectors are H's top-k right singular vectors, and memory stays independent of
the number of calibration tokens.
"""

from __future__ import annotations

from edgevlm.errors import UnsupportedModelError, UsageError

DEFAULT_K = 8


def removed_blocks(dropped: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed layers as (first, last), original indices."""
    blocks: list[tuple[int, int]] = []
    for i in sorted(dropped):
        if blocks and blocks[-1][1] == i - 1:
            blocks[-1] = (blocks[-1][0], i)
        else:
            blocks.append((i, i))
    return blocks


def top_directions(gram, k: int):
    """(hidden x k) top-k eigenvectors of a symmetric Gram matrix HᵀH (largest first) and
    the share of the gap's energy (squared norm) they hold."""
    import torch

    values, vectors = torch.linalg.eigh(gram)  # ascending
    k = min(k, gram.shape[0])
    top = vectors[:, -k:].flip(-1)
    total = float(values.clamp(min=0).sum())
    share = float(values[-k:].clamp(min=0).sum()) / total if total > 0 else 0.0
    return top, share


def compensated_weight(weight, directions):
    """(I + V Vᵀ) W for W (out x in) and V (out x k) orthonormal columns."""
    v = directions.to(weight.dtype)
    return weight + v @ (v.T @ weight)


def down_projection(layer):
    """The MLP down-projection (nn.Linear, y = W x) of a decoder layer."""
    proj = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if proj is None:
        raise UnsupportedModelError(f"{type(layer).__name__} has no mlp.down_proj to compensate",
                                    "prune without --compensate")
    return proj


def gap_grams(vlm, samples, blocks: list[tuple[int, int]], *, batch_size: int = 4) -> dict:
    """For each block, HᵀH of its gap over the real (non-padding) tokens of `samples`, and
    the token count: one forward of the unpruned model with block hooks."""
    import torch

    from edgevlm.scoring.hooks import capture_blocks, forward, iter_batches

    firsts = {first: (first, last) for first, last in blocks}
    lasts = {last: (first, last) for first, last in blocks}
    grams = {block: None for block in blocks}
    tokens = 0
    for batch in iter_batches(vlm, samples, batch_size):
        inputs: dict = {}
        mask = batch.real

        def on_block(index, block_in, block_out, mask=mask, inputs=inputs):
            if index in firsts:
                inputs[firsts[index]] = block_in[mask]
            if index in lasts:
                gap = (block_out[mask] - inputs[lasts[index]]).double()
                gram = gap.T @ gap
                block = lasts[index]
                grams[block] = gram if grams[block] is None else grams[block] + gram

        with torch.no_grad(), capture_blocks(vlm, on_block):
            forward(vlm, batch)
        tokens += int(mask.sum())
    return {"grams": grams, "tokens": tokens}


def compensate_(vlm, dropped: list[int], samples, k: int = DEFAULT_K, *,
                batch_size: int = 4) -> dict:
    """Edit, in place and before the layers are removed, the down-projection of the retained
    layer just before each removed block. Returns the record kept in the plan. A block that
    starts at layer 0 has no layer before it and is left uncompensated (listed as skipped)."""
    import torch

    if k < 1:
        raise UsageError(f"--compensate {k} must be at least 1", "use e.g. --compensate 8")
    if not samples:
        raise UsageError("compensation needs calibration samples", "pass --calib builtin:32")
    layers = vlm.adapter.layers(vlm.model)
    blocks = removed_blocks(dropped)
    edited = [(first, last) for first, last in blocks if first > 0]
    for first, _ in edited:
        down_projection(layers[first - 1])  # refuse before the forward pass
    found = gap_grams(vlm, samples, edited, batch_size=batch_size)
    edits = []
    for first, last in edited:
        directions, share = top_directions(found["grams"][(first, last)], k)
        proj = down_projection(layers[first - 1])
        with torch.no_grad():
            v = directions.to(proj.weight.device)
            proj.weight.copy_(compensated_weight(proj.weight.double(), v).to(proj.weight.dtype))
            if proj.bias is not None:  # y = W x + b: the whole output is scaled the same way
                b = proj.bias.double().unsqueeze(1)
                proj.bias.copy_(compensated_weight(b, v).squeeze(1).to(proj.bias.dtype))
        edits.append({"layer": first - 1, "block": [first, last], "energy_share": round(share, 4)})
    return {"method": "svl-subspace", "k": k, "edits": edits,
            "skipped": [[f, la] for f, la in blocks if f == 0],
            "samples": len(samples), "tokens": found["tokens"]}


def uncompensated_twin(base, plan_record: dict):
    """The same layers removed from `base` without compensation: what `eval` compares a
    compensated checkpoint with."""
    import copy

    from edgevlm.loader import LoadedVLM
    from edgevlm.prune import prune_
    from edgevlm.types import PrunePlan

    twin = LoadedVLM(model=copy.deepcopy(base.model), processor=base.processor,
                     adapter=base.adapter, name=f"{base.name} (uncompensated)", path=base.path)
    plan = PrunePlan.from_dict(plan_record)
    plan.compensation = None
    prune_(twin, plan)
    return twin
