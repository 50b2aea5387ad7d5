"""Uniform width pruning of the decoder (docs/methods.md section 5): every layer loses the same
number of attention head groups and MLP channels, the least important by first-order Taylor
importance |w * dL/dw| summed over each group's weights (LLM-Pruner), on ~10 calibration
samples.

Uniform, because transformers, llama.cpp and the ONNX builders describe every layer with one
`num_attention_heads`, `num_key_value_heads` and `intermediate_size`: ragged layers would not
load or convert. A head group is one key/value head with the query heads that share it
(GQA), so grouped attention stays valid. `head_dim` is written to the config explicitly
because it no longer equals hidden_size / num_attention_heads.

Families whose attention derives head_dim from hidden_size / num_attention_heads instead of
reading `head_dim` (Qwen2-VL and Qwen2.5-VL in transformers 5) cannot lose heads and still
load: for them only MLP channels are pruned, and the plan says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from edgevlm.errors import UnsupportedModelError, UsageError
from edgevlm.types import JsonMixin

TAYLOR_SAMPLES = 10
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class WidthPlan(JsonMixin):
    """What uniform width pruning kept, per layer (indices into the original heads/channels)."""

    ratio: float
    n_layers: int
    heads: list[int]  # [before, after] query heads per layer
    kv_heads: list[int]  # [before, after]
    intermediate: list[int]  # [before, after]
    head_dim: int
    kept_groups: list[list[int]]  # per layer, kept key/value head groups
    kept_channels: list[list[int]]  # per layer, kept MLP channels
    parameters: dict = field(default_factory=dict)  # decoder-layer parameters before / after
    samples: int = 0
    attention_note: str = ""
    method: str = "taylor"
    axis: str = "width"
    layers: list[int] = field(default_factory=list)  # no layer is removed

    def config_record(self) -> dict:
        """What goes into config.json (`edgevlm_plan`) and the manifest: a PrunePlan that
        removes no layer, with this plan's summary (not the index lists) as `width`."""
        from edgevlm.types import PrunePlan

        width = {"heads": self.heads, "kv_heads": self.kv_heads,
                 "intermediate": self.intermediate, "head_dim": self.head_dim,
                 "parameters": self.parameters,
                 **({"attention_note": self.attention_note} if self.attention_note else {})}
        return PrunePlan(method=self.method, n_layers=self.n_layers, layers=[],
                         ratio=self.ratio, width=width).to_dict()

    def summary(self) -> str:
        p = self.parameters
        return (f"heads {self.heads[0]}->{self.heads[1]} (kv {self.kv_heads[0]}->"
                f"{self.kv_heads[1]}), MLP {self.intermediate[0]}->{self.intermediate[1]} in "
                f"all {self.n_layers} layers; decoder-layer parameters "
                f"{p['before'] / 1e6:.2f} M -> {p['after'] / 1e6:.2f} M")


def check_ratio(ratio: float | None) -> None:
    if ratio is None:
        raise UsageError("width pruning needs --ratio", "e.g. --axis width --ratio 0.3")
    if not 0 < ratio < 1:
        raise UsageError(f"--ratio {ratio} is outside (0, 1)", "e.g. --axis width --ratio 0.3")


def _modules(layer):
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in ATTN) \
            or not all(hasattr(mlp, n) for n in MLP):
        raise UnsupportedModelError(f"{type(layer).__name__} lacks q/k/v/o and gate/up/down "
                                    "projections", "width pruning supports Llama-style layers")
    return attn, mlp


def heads_prunable(vlm) -> bool:
    """Whether this family's attention takes head_dim from the config: build one attention
    module with half the heads and see whether its projections keep the head size."""
    text = vlm.config.get_text_config()
    attn, _ = _modules(vlm.adapter.layers(vlm.model)[0])
    kv = int(text.num_key_value_heads)
    if kv < 2:
        return False
    probe = copy.deepcopy(text)
    probe.num_key_value_heads = kv // 2
    probe.num_attention_heads = int(text.num_attention_heads) // kv * (kv // 2)
    probe.head_dim = attn.head_dim
    import torch

    with torch.device("meta"):
        module = type(attn)(probe, layer_idx=0)
    return module.q_proj.out_features == probe.num_attention_heads * attn.head_dim


def _loss(vlm, samples):
    """Answer cross-entropy when every sample has an answer, else next-token loss on the
    prompt's text tokens: the L of |w * dL/dw|."""
    import torch.nn.functional as F

    from edgevlm.prompting import encode, model_inputs
    from edgevlm.training import answer_loss

    with_answer = all(s.answer for s in samples)
    batch = encode(vlm, samples, with_answer=with_answer)
    logits = vlm.model(**model_inputs(batch)).logits
    if with_answer:
        return answer_loss(logits, batch)
    ids = batch["input_ids"]
    mask = (batch["attention_mask"].bool() & ~vlm.adapter.visual_mask(ids, vlm.config))[:, 1:]
    return F.cross_entropy(logits[:, :-1][mask].float(), ids[:, 1:][mask])


def taylor_importance(vlm, samples, *, batch_size: int = 4) -> list[dict]:
    """Per layer {"groups": (kv_heads,), "channels": (intermediate,)} importance: |w * dL/dw|
    summed over each key/value group's q/k/v rows and o columns (biases included), and over
    each MLP channel's gate/up rows and down column. Gradients accumulate over all samples."""
    import torch

    model = vlm.model
    layers = vlm.adapter.layers(model)
    tracked = []
    for layer in layers:
        attn, mlp = _modules(layer)
        tracked += [p for name in ATTN for p in getattr(attn, name).parameters()]
        tracked += [p for name in MLP for p in getattr(mlp, name).parameters()]
    saved = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for p in tracked:
        p.requires_grad_(True)
        p.grad = None
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            (_loss(vlm, chunk) * len(chunk) / len(samples)).backward()
        text = vlm.config.get_text_config()
        kv = int(text.num_key_value_heads)
        scores = []
        with torch.no_grad():
            for layer in layers:
                attn, mlp = _modules(layer)
                scores.append({"groups": _group_scores(attn, kv),
                               "channels": _channel_scores(mlp)})
    finally:
        for p in tracked:
            p.grad = None
        for p, flag in saved:
            p.requires_grad_(flag)
    return scores


def _saliency(linear, dim: int, n: int):
    """|w * g| of a linear layer summed into n equal blocks along dim 0 (rows) or 1 (cols)."""
    s = (linear.weight * linear.weight.grad).abs().float()
    total = s.reshape(n, -1, s.shape[1]).sum(dim=(1, 2)) if dim == 0 else \
        s.reshape(s.shape[0], n, -1).sum(dim=(0, 2))
    if dim == 0 and linear.bias is not None and linear.bias.grad is not None:
        total = total + (linear.bias * linear.bias.grad).abs().float().reshape(n, -1).sum(1)
    return total


def _group_scores(attn, kv: int):
    return (_saliency(attn.q_proj, 0, kv) + _saliency(attn.k_proj, 0, kv)
            + _saliency(attn.v_proj, 0, kv) + _saliency(attn.o_proj, 1, kv)).cpu()


def _channel_scores(mlp):
    n = mlp.gate_proj.out_features
    return (_saliency(mlp.gate_proj, 0, n) + _saliency(mlp.up_proj, 0, n)
            + _saliency(mlp.down_proj, 1, n)).cpu()


def _sliced(linear, rows=None, cols=None):
    """A new nn.Linear holding the given output rows / input columns of `linear`."""
    import torch

    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                          device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias)
    return new


def _rows(groups: list[int], size: int):
    """Row indices of the kept blocks of `size` rows each."""
    import torch

    return torch.tensor([g * size + i for g in groups for i in range(size)], dtype=torch.long)


def decoder_layer_parameters(vlm) -> int:
    return sum(p.numel() for p in vlm.adapter.layers(vlm.model).parameters())


def prune_width_(vlm, samples, ratio: float, *, batch_size: int = 4) -> WidthPlan:
    """Score on `samples[:TAYLOR_SAMPLES]` and narrow every decoder layer in place; the
    config is updated so save_pretrained writes a checkpoint that reloads as it is."""
    import torch

    check_ratio(ratio)
    if not samples:
        raise UsageError("width pruning needs calibration samples", "pass --calib builtin:32")
    text = vlm.config.get_text_config()
    layers = vlm.adapter.layers(vlm.model)
    attn0, mlp0 = _modules(layers[0])
    heads, kv = int(text.num_attention_heads), int(text.num_key_value_heads)
    head_dim, inter = int(attn0.head_dim), int(mlp0.gate_proj.out_features)
    rep = heads // kv
    prunable = heads_prunable(vlm)
    keep_groups = kv - min(round(ratio * kv), kv - 1) if prunable else kv
    keep_channels = inter - min(round(ratio * inter), inter - 1)
    note = "" if prunable else (
        f"{type(attn0).__name__} derives head_dim from hidden_size / num_attention_heads, so "
        "heads cannot be removed and still load: only MLP channels were pruned")
    before = decoder_layer_parameters(vlm)
    used = samples[:TAYLOR_SAMPLES]
    scores = taylor_importance(vlm, used, batch_size=batch_size)
    kept_groups, kept_channels = [], []
    for layer, score in zip(layers, scores, strict=True):
        attn, mlp = _modules(layer)
        groups = sorted(torch.topk(score["groups"], keep_groups).indices.tolist())
        channels = sorted(torch.topk(score["channels"], keep_channels).indices.tolist())
        q_rows, kv_rows = _rows(groups, rep * head_dim), _rows(groups, head_dim)
        attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced(attn.o_proj, cols=q_rows)
        ch = torch.tensor(channels, dtype=torch.long)
        mlp.gate_proj = _sliced(mlp.gate_proj, rows=ch)
        mlp.up_proj = _sliced(mlp.up_proj, rows=ch)
        mlp.down_proj = _sliced(mlp.down_proj, cols=ch)
        for module in (attn, mlp):  # attributes some families keep besides the config
            for name, value in (("num_heads", rep * keep_groups), ("num_key_value_heads", keep_groups),
                                ("intermediate_size", keep_channels)):
                if hasattr(module, name):
                    setattr(module, name, value)
        kept_groups.append(groups)
        kept_channels.append(channels)
    text.num_attention_heads, text.num_key_value_heads = rep * keep_groups, keep_groups
    text.intermediate_size, text.head_dim = keep_channels, head_dim
    plan = WidthPlan(ratio=ratio, n_layers=len(layers), heads=[heads, rep * keep_groups],
                     kv_heads=[kv, keep_groups], intermediate=[inter, keep_channels],
                     head_dim=head_dim, kept_groups=kept_groups, kept_channels=kept_channels,
                     parameters={"before": before, "after": decoder_layer_parameters(vlm)},
                     samples=len(used), attention_note=note)
    from edgevlm.prune import PLAN_CONFIG_KEY

    setattr(vlm.model.config, PLAN_CONFIG_KEY, plan.config_record())
    return plan
