"""Running calibration batches and capturing what every decoder block sees and produces.

Everything here works on the raw block input/output (forward hooks on the decoder layers),
not on HF `hidden_states`, whose last entry is taken after the final norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edgevlm.errors import CalibrationError, EdgeVLMError, UsageError

TOKEN_SUBSETS = ("all", "text", "visual")


@dataclass
class Batch:
    """One encoded calibration batch and its token masks (all bool, batch x seq)."""

    inputs: dict  # ready for model(**inputs)
    real: Any  # not padding
    visual: Any  # image-feature positions
    last: Any  # (batch,) index of each row's last real token (the next-token position)
    size: int

    def tokens(self, subset: str):
        """Mask of the positions in a token subset: all real tokens, text only, visual only."""
        if subset == "all":
            return self.real
        if subset == "visual":
            return self.visual & self.real
        if subset == "text":
            return self.real & ~self.visual
        raise UsageError(f"unknown token subset '{subset}'", f"use one of: {', '.join(TOKEN_SUBSETS)}")


def iter_batches(vlm, samples, batch_size: int) -> Iterator[Batch]:
    """Encode samples in left-padded batches (edgevlm.prompting.encode) with their masks."""
    import torch

    from edgevlm.prompting import encode, model_inputs

    if not samples:
        raise CalibrationError("no calibration samples to score with",
                               "pass a calibration set with at least one scoring sample")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}", "use --batch-size 1 or more")
    for start in range(0, len(samples), batch_size):
        encoded = encode(vlm, samples[start:start + batch_size])
        inputs = model_inputs(encoded)
        real = inputs["attention_mask"].bool()
        seq = real.shape[1]
        positions = torch.arange(seq, device=real.device).expand_as(real)
        last = torch.where(real, positions, -1).amax(dim=1)
        _add_position_ids(vlm, inputs, real)
        yield Batch(inputs=inputs, real=real, visual=vlm.adapter.visual_mask(inputs["input_ids"], vlm.config),
                    last=last, size=real.shape[0])


def _add_position_ids(vlm, inputs: dict, real) -> None:
    """Give padded rows the positions they would have alone (HF counts from the first pad
    otherwise), so a sample's scores do not depend on what it was batched with. Models with
    multimodal rotary positions (Qwen2-VL's M-RoPE) derive them from the mask themselves."""
    inner = getattr(vlm.model, "model", vlm.model)
    if hasattr(inner, "get_rope_index") or "position_ids" in inputs:
        return
    inputs["position_ids"] = (real.long().cumsum(-1) - 1).clamp(min=0)


def forward(vlm, batch: Batch, logits: bool = False):
    """Run the whole model on a batch (no KV cache; logits at the last position only)."""
    return vlm.model(**batch.inputs, use_cache=False, logits_to_keep=1 if not logits else 0)


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _output(out):
    # transformers 5 decoder layers return a tensor; older ones a tuple
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def capture_blocks(vlm, on_block: Callable[[int, Any, Any], None]):
    """Call on_block(layer_index, block_input, block_output) (fp32, batch x seq x hidden)
    for every decoder layer during forwards inside the context."""
    handles = []
    for index, layer in enumerate(vlm.adapter.layers(vlm.model)):
        def hook(module, args, kwargs, out, index=index):
            on_block(index, _hidden(args, kwargs).float(), _output(out).float())
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerCall:
    """How the text model called one decoder layer: re-invoke it with another input."""

    layer: Any
    args: tuple
    kwargs: dict
    output: Any = None

    def __call__(self, hidden):
        args = (hidden, *self.args[1:]) if self.args else ()
        kwargs = self.kwargs if self.args else dict(self.kwargs, hidden_states=hidden)
        return _output(self.layer(*args, **kwargs))

    @property
    def input(self):
        return _hidden(self.args, self.kwargs)


@contextlib.contextmanager
def record_calls(vlm, keep_output_of_last: bool = True):
    """Record every decoder layer's call (args, kwargs: attention mask, rotary embeddings,
    position ids...) during a forward, in layer order. Re-invoking these calls needs no
    knowledge of how each family builds its masks (Gemma3 sliding windows) or positions
    (Qwen2-VL M-RoPE). The recorded inputs are references, not copies."""
    layers = vlm.adapter.layers(vlm.model)
    calls: list[LayerCall] = []
    handles = []
    for layer in layers:
        def pre(module, args, kwargs):
            calls.append(LayerCall(module, args, dict(kwargs)))
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    if keep_output_of_last:
        def post(module, args, kwargs, out):
            calls[-1].output = _output(out)
        handles.append(layers[len(layers) - 1].register_forward_hook(post, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def count_layer_calls(vlm):
    """Count decoder-layer invocations (model forwards and direct calls alike)."""
    counter = {"calls": 0}

    def pre(module, args):
        counter["calls"] += 1

    handles = [layer.register_forward_pre_hook(pre) for layer in vlm.adapter.layers(vlm.model)]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def head_logprobs(vlm, hidden, last):
    """Next-token log-probabilities (fp32) from final-layer hidden states at `last`:
    final norm + lm_head, exactly what the *ForConditionalGeneration forward does for
    the families edgevlm supports (none applies a logit soft-cap in transformers 5.23)."""
    import torch

    rows = torch.arange(hidden.shape[0], device=hidden.device)
    picked = hidden[rows, last.to(hidden.device)]
    adapter = vlm.adapter
    logits = adapter.lm_head_module(vlm.model)(adapter.final_norm(vlm.model)(picked))
    return torch.log_softmax(logits.float(), dim=-1)


def _configs(model) -> list:
    """The model's config and every nested sub-config (vision, text, ...)."""
    seen, todo = {}, [model.config]
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation_internal"):
            todo.append(module.config)
    while todo:
        config = todo.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                todo.append(sub)
    return list(seen.values())


@contextlib.contextmanager
def eager_attention(vlm):
    """Switch the whole model to eager attention (so attention modules return their
    probabilities, and masks are built in eager's additive form), then restore exactly."""
    model = vlm.model
    saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
    try:
        model.set_attn_implementation("eager")
    except (ValueError, AttributeError) as exc:
        raise EdgeVLMError(f"cannot switch {type(model).__name__} to eager attention: {exc}",
                           "this scorer needs attention maps; reload the model with "
                           "attn_implementation='eager'") from exc
    try:
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value
