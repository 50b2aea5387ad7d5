"""ShortV freezing (docs/methods.md section 4): in frozen decoder layers the visual tokens
skip the layer's query, output projection and MLP (their hidden states pass through
unchanged) but still provide keys and values, so text tokens attend to them.

The frozen layers are recorded in the checkpoint's config.json under `edgevlm_freeze`, as
the freeze plan's JSON (a PrunePlan with mode 'freeze'); nothing is removed.
`edgevlm.loader.load` installs the freeze forward when it finds the record; stock
`from_pretrained` ignores it and runs the normal forward.

The freeze forward does the saving for real: a frozen layer gathers the rows that need work
(text rows) before the query projection, the output projection and the MLP, computes keys
and values for every row, and scatters the new text rows back into the unchanged hidden
states. The same code is what `export/onnx_export/freeze_prefill.py` traces into the ONNX
prefill graph, so there the Q / O / MLP matrix products run over the text rows only.

Which rows are visual comes from the prompt's image-token ids (`ArchAdapter.visual_mask`),
read from `input_ids` by a pre-hook on the model's forward: a call without image tokens
(every decode step) runs every layer normally. Batches: a row index is computed if it is a
text token in any sequence of the batch, and its result is kept only where it is text.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from edgevlm.errors import UnsupportedModelError, UsageError

FREEZE_CONFIG_KEY = "edgevlm_freeze"


class FreezeState:
    """What the frozen layers of one model need during one forward: the rows to compute
    (1-D int64 indices into the sequence) and, for batches where those rows are not text in
    every sequence, which of them to keep (bool, batch x rows). rows None: run normally."""

    def __init__(self):
        self.rows = None
        self.keep = None

    def set(self, rows, keep=None) -> None:
        self.rows, self.keep = rows, keep

    def clear(self) -> None:
        self.rows = self.keep = None


def frozen_layers(config) -> list[int]:
    """Frozen layer indices recorded in a (transformers) config, [] if none."""
    record = getattr(config, FREEZE_CONFIG_KEY, None)
    if isinstance(config, dict):
        record = config.get(FREEZE_CONFIG_KEY)
    return list((record or {}).get("layers") or [])


def record_(vlm, plan) -> None:
    """Record a freeze plan in the model's config (saved with it); nothing else changes."""
    plan.validate()
    n = vlm.adapter.num_layers(vlm.config)
    if plan.mode != "freeze":
        raise UsageError(f"plan mode '{plan.mode}' is not a freeze plan", "use --mode freeze")
    if plan.n_layers != n:
        raise UsageError(f"freeze plan is for {plan.n_layers} layers, the model has {n}",
                         "make the plan on the model it is applied to")
    setattr(vlm.model.config, FREEZE_CONFIG_KEY, plan.to_dict())  # edgevlm_plan's schema


def install(vlm, layers: list[int] | None = None) -> FreezeState:
    """Make `layers` (default: the ones recorded in the config) of vlm's decoder frozen for
    visual tokens, in place. Idempotent per model; returns the shared state.

    Everything installed lives on the modules (a bound method as each frozen layer's
    `forward`, the state and a callable hook object on the model), so `copy.deepcopy` of the
    model gives a copy that is frozen the same way with its own state."""
    import types

    model, adapter = vlm.model, vlm.adapter
    layers = frozen_layers(model.config) if layers is None else sorted(layers)
    decoder = adapter.layers(model)
    bad = [i for i in layers if not 0 <= i < len(decoder)]
    if bad:
        raise UsageError(f"freeze record names layers {bad} outside 0..{len(decoder) - 1}",
                         "was the checkpoint's layer count changed after freezing?")
    state = getattr(model, "_edgevlm_freeze_state", None)
    if state is None:
        state = FreezeState()
        model._edgevlm_freeze_state = state
        hook = _VisualRows(state, adapter, model.config)
        model._edgevlm_freeze_hooks = [
            model.register_forward_pre_hook(hook, with_kwargs=True),
            model.register_forward_hook(hook.done, always_call=True),
        ]
    for index, layer in enumerate(decoder):
        frozen = "_edgevlm_freeze_state" in layer.__dict__
        if index in layers and not frozen:
            _check_layer(layer)
            layer._edgevlm_freeze_state = state
            layer.forward = types.MethodType(_frozen_forward, layer)
        elif index not in layers and frozen:
            del layer.forward, layer._edgevlm_freeze_state
    model._edgevlm_frozen = list(layers)
    return state


def uninstall(vlm) -> None:
    """Undo `install`: every layer runs its own forward again."""
    model = vlm.model
    for layer in vlm.adapter.layers(model):
        if "_edgevlm_freeze_state" in layer.__dict__:
            del layer.forward, layer._edgevlm_freeze_state
    for handle in getattr(model, "_edgevlm_freeze_hooks", []):
        handle.remove()
    for name in ("_edgevlm_freeze_state", "_edgevlm_freeze_hooks", "_edgevlm_frozen"):
        if hasattr(model, name):
            delattr(model, name)


def installed_layers(vlm) -> list[int]:
    return list(getattr(vlm.model, "_edgevlm_frozen", []))


class _VisualRows:
    """Model forward pre-hook: which rows the frozen layers compute, from `input_ids`."""

    def __init__(self, state: FreezeState, adapter, config):
        self.state, self.adapter, self.config = state, adapter, config

    def __call__(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.state.clear()
        if input_ids is None or input_ids.dim() != 2:
            return
        visual = self.adapter.visual_mask(input_ids, self.config)
        if not bool(visual.any()):
            return  # text only (every decode step): nothing to freeze
        self.state.set(*rows_to_compute(visual))

    def done(self, *args, **kwargs):
        self.state.clear()


def rows_to_compute(visual):
    """(rows, keep) for a (batch, seq) visual mask: the sequence positions that are text in
    at least one sequence, and which of them are text per sequence (None when all are)."""
    import torch

    text = ~visual
    rows = torch.nonzero(text.any(0)).squeeze(1)
    keep = text.index_select(1, rows)
    return rows, (None if bool(keep.all()) else keep)


def _check_layer(layer) -> None:
    attn = getattr(layer, "self_attn", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim", "layer_idx")
    if (attn is None or any(not hasattr(attn, n) for n in needed) or not hasattr(layer, "mlp")
            or not hasattr(layer, "input_layernorm") or not hasattr(layer, "post_attention_layernorm")):
        raise UnsupportedModelError(
            f"cannot freeze visual tokens in {type(layer).__name__}: not a Llama/Qwen2/Gemma3-style "
            "decoder layer (self_attn with q/k/v/o projections, mlp, input/post-attention norms)",
            "use --mode drop for this model")


def _frozen_forward(layer, *args, **kwargs):
    """A frozen layer's forward (bound to the layer): the freeze path while the model's
    forward has visual rows, the layer's own forward otherwise."""
    state = layer._edgevlm_freeze_state
    original = type(layer).forward.__get__(layer)
    if state.rows is None:
        return original(*args, **kwargs)
    values = inspect.signature(original).bind(*args, **kwargs).arguments
    values = {**values, **values.pop("kwargs", {})}
    return freeze_layer(layer, values["hidden_states"], state.rows, state.keep,
                        values.get("attention_mask"), values.get("position_embeddings"),
                        values.get("past_key_values"))


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x, cos, sin):
    """The rotary embedding of these families' decoders (cos/sin: batch x seq x head_dim;
    Qwen2-VL's M-RoPE sections are already merged into them by its rotary module)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _bias(mask, rows, q_len: int, kv_len: int, dtype):
    """Additive attention bias (batch or 1, 1, rows, kv_len) for the query rows `rows`."""
    import torch

    floor = torch.finfo(dtype).min
    if mask is None:  # causal (transformers skips building a purely causal mask)
        q_pos = rows + (kv_len - q_len)
        allowed = torch.arange(kv_len, device=rows.device)[None, :] <= q_pos[:, None]
        return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), floor, dtype=dtype))[None, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise UnsupportedModelError(
            f"freeze forward got an attention mask of type {type(mask).__name__}",
            "load the model with attn_implementation='sdpa' or 'eager'")
    picked = mask.index_select(2, rows)[..., :kv_len]
    if picked.dtype == torch.bool:
        return torch.where(picked, torch.zeros((), dtype=dtype), torch.full((), floor, dtype=dtype))
    return picked.to(dtype)


def freeze_layer(layer, hidden, rows, keep, attention_mask, position_embeddings, cache):
    """One decoder layer with visual rows frozen: the attention queries, the output
    projection and the MLP run on `rows` only; keys and values on every row."""
    import torch

    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    head_dim = attn.head_dim
    normed = layer.input_layernorm(hidden)
    key = attn.k_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    value = attn.v_proj(normed).view(batch, seq, -1, head_dim).transpose(1, 2)
    picked = normed.index_select(1, rows)
    n_rows = picked.shape[1]
    query = attn.q_proj(picked).view(batch, n_rows, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Gemma 3
        query, key = attn.q_norm(query), attn.k_norm(key)
    cos, sin = position_embeddings
    query = _rope(query, cos.index_select(1, rows), sin.index_select(1, rows))
    key = _rope(key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    kv_len = key.shape[2]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * attn.scaling
    scores = scores + _bias(attention_mask, rows, seq, kv_len, scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).reshape(batch, n_rows, -1)
    out = attn.o_proj(out)
    residual = hidden.index_select(1, rows)
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3: norms around both sublayers
        mid = residual + layer.post_attention_layernorm(out)
        new = mid + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(mid)))
    else:
        mid = residual + out
        new = mid + layer.mlp(layer.post_attention_layernorm(mid))
    if keep is not None:
        new = torch.where(keep[..., None], new, residual)
    return hidden.index_copy(1, rows, new)


def check_plan_method(method: str | None, options: dict | None = None, tokens: str | None = None) -> None:
    """Freeze plans come from visual LC (ShortV's criterion)."""
    if method and method != "lc":
        raise UsageError(f"--mode freeze chooses layers by visual LC, not '{method}'",
                         "use --method lc (or --plan with a freeze plan)")
    if tokens and tokens != "visual":
        raise UsageError(f"--mode freeze needs LC on visual tokens, not --tokens {tokens}",
                         "drop --tokens (visual is the default)")


def prefill_flops(config, visual, frozen, *, causal: bool = True) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of one prompt's prefill from an empty cache
    with the visual rows frozen in the `frozen` layers: q/k/v/o projections, attention (scores
    and weighted values), the gated MLP, and the lm_head at the last position only (the
    exported prefill graphs return only those logits). `visual`: one bool per prompt position.

    A frozen layer computes keys and values for every row and the rest for the text rows
    only, and a text row at position p attends to the p + 1 keys up to it (`causal`), or to
    every key (`causal=False`: what a dense masked matmul executes, as PyTorch's eager path
    and the torch.onnx graphs do). Where the text rows sit matters: a prompt's text mostly
    follows its image, so those rows attend to nearly the whole prompt."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    inter, layers = int(text.intermediate_size), int(text.num_hidden_layers)
    visual = [bool(v) for v in visual]
    n = len(visual)
    keys = (lambda p: p + 1) if causal else (lambda p: n)

    def layer(rows) -> float:
        k_v = 2 * n * hidden * kv * head_dim * 2
        q_o = 2 * len(rows) * hidden * heads * head_dim * 2
        attention = 4 * heads * head_dim * sum(keys(p) for p in rows)
        mlp = 2 * len(rows) * hidden * inter * 3
        return k_v + q_o + attention + mlp

    every = layer(range(n))
    text_rows = layer([p for p in range(n) if not visual[p]])
    n_frozen = len(set(frozen))
    lm_head = 2 * hidden * int(text.vocab_size)
    return (layers - n_frozen) * every + n_frozen * text_rows + lm_head


def flops_ratio(config, visual, frozen) -> dict:
    """Prefill FLOPs of a prompt (`visual`: one bool per position) without and with
    freezing, causal and as a dense matmul executes them (`prefill_flops`), and the ideal
    speed-up freezing can buy: full / frozen FLOPs."""
    out = {"tokens": len(visual), "visual_tokens": int(sum(bool(v) for v in visual)),
           "frozen_layers": len(set(frozen))}
    for name, causal in (("", True), ("dense_", False)):
        full = prefill_flops(config, visual, [], causal=causal)
        cut = prefill_flops(config, visual, frozen, causal=causal)
        out.update({f"{name}full_gflops": full / 1e9, f"{name}freeze_gflops": cut / 1e9,
                    f"{name}ideal_speedup": full / cut})
    return out


GGUF_REFUSAL = ("GGUF cannot freeze visual tokens (ShortV --mode freeze): llama.cpp has no "
                "prefill graph that skips them; use --target onnx")


def refuse_gguf(model_config) -> None:
    """UnsupportedModelError (exit 2, one line) when a model to be written as GGUF has frozen
    layers: `model_config` is a transformers config, a config.json dict, a checkpoint folder
    or None."""
    import json

    if model_config is None:
        return
    if isinstance(model_config, (str, Path)):
        path = Path(model_config) / "config.json"
        if not path.exists():
            return
        model_config = json.loads(path.read_text())
    if frozen_layers(model_config):
        raise UnsupportedModelError(GGUF_REFUSAL)


def check_args(args) -> None:
    """CLI checks of --mode freeze before any work (prune/export)."""
    from edgevlm.types import PrunePlan

    mode = getattr(args, "mode", "drop")
    plan_mode = None
    if getattr(args, "plan", None) and Path(args.plan).exists():
        plan_mode = PrunePlan.load(args.plan).mode
    if mode != "freeze" and plan_mode != "freeze":
        return
    if getattr(args, "target", None) == "gguf":
        raise UnsupportedModelError(GGUF_REFUSAL)
    if getattr(args, "axis", "layers") == "width":
        raise UsageError("--mode freeze keeps every layer whole; --axis width narrows them",
                         "use one of them")
    if getattr(args, "compensate", None):
        raise UsageError("--compensate repairs removed blocks, and --mode freeze removes none",
                         "drop --compensate")
    if getattr(args, "recover", None):
        raise UsageError("--recover heals removed layers' loss, and --mode freeze removes none",
                         "drop --recover")
    if mode == "freeze" and not getattr(args, "plan", None):
        check_plan_method(args.method, tokens=getattr(args, "tokens", None))

