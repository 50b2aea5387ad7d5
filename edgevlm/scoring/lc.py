"""LC — Layer Contribution (ShortV, arXiv 2504.00502).

LC_i^X = KL(P_modified || P_original) of the next-token distribution at the last prompt
position, where in the modified model layer i leaves the tokens of type X unchanged: both
its residual updates (attention and MLP) are zeroed at those positions, while every token
still provides keys and values.

Prefix reuse (default): layers before i are identical in both models, so one unmodified
forward records each layer's call (input, masks, rotary embeddings) and ablating layer i
re-runs only layers i..L-1 — L + L(L+1)/2 layer calls per batch instead of the reference
code's (L+1)·L. Within layer i the ablation is exact as an output substitution,
`where(mask, x, layer(x))`: tokens interact only through attention keys/values, which are
computed from the unchanged input, and the MLP is per token. `naive=True` instead runs the
whole model once per layer with the attention and MLP outputs literally zeroed (hooks),
which is how the test checks the shortcut.

Memory: the unmodified run's per-layer inputs of one batch are kept while that batch is
scored (layers x batch x seq x hidden); lower --batch-size for large models.
"""

from __future__ import annotations

import contextlib

from edgevlm.scoring.base import Scorer, register
from edgevlm.scoring.hooks import TOKEN_SUBSETS, forward, head_logprobs, record_calls


def kl(logp, logq):
    """KL(P || Q) per row from log-probabilities, in float64."""
    logp, logq = logp.double(), logq.double()
    return (logp.exp() * (logp - logq)).sum(-1)


def run_lc(vlm, batches, n_layers: int, tokens: str = "visual", naive: bool = False):
    import torch

    totals = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    for batch in batches:
        mask = batch.tokens(tokens)
        per_layer = _naive(vlm, batch, mask, n_layers) if naive else _prefix(vlm, batch, mask)
        totals += torch.stack(per_layer).sum(-1).cpu()
        count += batch.size
    return (totals / count).tolist(), {"tokens": tokens, "mode": "naive" if naive else "prefix"}


def _prefix(vlm, batch, mask) -> list:
    import torch

    with record_calls(vlm) as calls:
        forward(vlm, batch)
    original = head_logprobs(vlm, calls[-1].output, batch.last)
    keep = mask.unsqueeze(-1)
    out = []
    for i, call in enumerate(calls):
        hidden = torch.where(keep.to(call.input.device), call.input, call(call.input))
        for later in calls[i + 1:]:
            hidden = later(hidden)
        out.append(kl(head_logprobs(vlm, hidden, batch.last), original))
    return out


def _naive(vlm, batch, mask, n_layers: int) -> list:
    import torch

    def model_logprobs():
        logits = forward(vlm, batch, logits=not _last_is_final(batch)).logits
        rows = torch.arange(batch.size, device=logits.device)
        picked = logits[:, -1] if logits.shape[1] == 1 else logits[rows, batch.last]
        return torch.log_softmax(picked.float(), dim=-1)

    original = model_logprobs()
    out = []
    layers = vlm.adapter.layers(vlm.model)
    for i in range(n_layers):
        with _zero_updates(layers[i], mask):
            out.append(kl(model_logprobs(), original))
    return out


def _last_is_final(batch) -> bool:
    return bool((batch.last == batch.real.shape[1] - 1).all())


@contextlib.contextmanager
def _zero_updates(layer, mask):
    """Zero the attention and MLP outputs of `layer` at the masked positions."""
    import torch

    keep = (~mask).unsqueeze(-1)

    def zero_attn(module, args, out):
        if isinstance(out, tuple):
            return (out[0] * keep.to(out[0].device), *out[1:])
        return out * keep.to(out.device)

    def zero_mlp(module, args, out):
        return out * keep.to(out.device)

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        # Unknown layer layout: fall back to substituting the layer output (equivalent).
        def substitute(module, args, kwargs, out):
            hidden = args[0] if args else kwargs["hidden_states"]
            res = out[0] if isinstance(out, tuple) else out
            new = torch.where(keep.to(res.device), res, hidden)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        handles = [layer.register_forward_hook(substitute, with_kwargs=True)]
    else:
        handles = [attn.register_forward_hook(zero_attn), mlp.register_forward_hook(zero_mlp)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


register(Scorer(
    name="lc",
    summary="Layer Contribution: KL of next-token distribution when a layer skips one token type",
    run=run_lc,
    defaults={"tokens": "visual", "naive": False},
    choices={"tokens": TOKEN_SUBSETS, "naive": (False, True)},
    runtime=("naive",),
    paper="ShortV, arXiv 2504.00502",
))
