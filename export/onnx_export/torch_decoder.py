"""Fallback decoder through torch.onnx, for families the builder's graph cannot express.

Gemma3 is the case: in prefill its image tokens attend to each other bidirectionally, which
the builder's causal GroupQueryAttention cannot do. The graph takes what transformers.js feeds
a decoder (`inputs_embeds`, `position_ids`, `past_key_values.*`; no `attention_mask`: one
unpadded prompt) and builds the attention biases itself: causal, sliding window, and both
ways within a run of image tokens. Which rows are image tokens travels with the embeddings:
`inputs_embeds` has one extra last channel (IMAGE_FLAG), 0 from `embed_tokens`, 1 from the
vision encoder's features, so a client that writes features into the image-token rows (as
transformers.js and edgevlm's runner do) marks them. KV is not written in place (metadata
`edgevlm.kv_in_place` = 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgevlm.runtimes import families


def image_flag(family: str) -> bool:
    """Whether the family's embed_tokens / vision_encoder / decoder graphs carry the image-flag
    channel: those whose prefill attends both ways among an image's tokens (the family
    table's `bidirectional_images`), which this decoder builds from the flag."""
    return families.family(family).bidirectional_images


class BiasDecoder(nn.Module):
    """inputs_embeds (+ flag channel), position_ids, *past -> last logits, *present."""

    def __init__(self, vlm):
        super().__init__()
        self.text = vlm.adapter.text_stack(vlm.model)
        self.lm_head = vlm.adapter.lm_head_module(vlm.model)
        text = vlm.config.get_text_config()
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.window = getattr(text, "sliding_window", None)
        self.n_layers = len(self.text.layers)

    def forward(self, inputs_embeds, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        embeds, flag = inputs_embeds[..., :-1], inputs_embeds[..., -1]
        masks = self.biases(flag, past[0].shape[2], embeds.dtype)
        out = self.text(inputs_embeds=embeds, attention_mask=masks, position_ids=position_ids,
                        past_key_values=cache, use_cache=True)
        return logits_and_present(self.lm_head, self.softcap, out.last_hidden_state, cache)

    def biases(self, flag, past_len, dtype) -> dict:
        """Additive (B, 1, new, past + new) biases per layer type: causal, except that tokens of
        one run of image tokens (in this call) see each other both ways; sliding layers also see
        only `window` back."""
        new = flag.shape[1]
        q = torch.arange(new, device=flag.device)[:, None] + past_len
        k = torch.arange(past_len + new, device=flag.device)[None, :]
        causal = k <= q
        image = flag > 0.5
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        run = torch.cumsum(starts.to(torch.int64), dim=1) * image  # 1, 2, ... per run; 0 text
        run_k = torch.nn.functional.pad(run, (past_len, 0))
        same = (run[:, :, None] > 0) & (run[:, :, None] == run_k[:, None, :])
        full = causal[None] | same
        sliding = ((causal & (q - k < self.window))[None] | same) if self.window else full
        zero, floor = torch.zeros((), dtype=dtype), torch.finfo(dtype).min
        return {"full_attention": torch.where(full, zero, floor)[:, None],
                "sliding_attention": torch.where(sliding, zero, floor)[:, None]}


def export_torch_decoder(vlm, path: Path) -> dict:
    """Export BiasDecoder with dynamic batch-1 sequence and past lengths."""
    import onnx

    from edgevlm.export.onnx_export.vision import _export

    text = vlm.config.get_text_config()
    heads = int(text.num_attention_heads)
    kv, hd = int(text.num_key_value_heads or heads), int(getattr(text, "head_dim", 0) or text.hidden_size // heads)
    n = int(text.num_hidden_layers)
    s, p = 5, 3
    seq = torch.export.Dim("sequence_length", min=1, max=1 << 17)
    past_len = torch.export.Dim("past_sequence_length", min=0, max=1 << 17)
    past = tuple(torch.randn(1, kv, p, hd) for _ in range(2 * n))
    flag = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])[None, :, None]
    example = (torch.cat([torch.randn(1, s, int(text.hidden_size)), flag], dim=-1),
               torch.arange(p, p + s)[None], past)
    names = ["inputs_embeds", "position_ids"]
    kv_names = [f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    dynamic = ({1: seq}, {1: seq}, tuple({2: past_len} for _ in range(2 * n)))
    _export(BiasDecoder(vlm).eval(), example, path, names + kv_names, out_names, dynamic)
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {"edgevlm.kv_in_place": "0"})
    onnx.save(model, str(path))
    return {"inputs": names + kv_names, "outputs": out_names}


def logits_and_present(lm_head, softcap, hidden, cache) -> tuple:
    """The decoder graphs' outputs: last-position logits (soft-capped where the model does),
    then present.{i}.key/value in layer order."""
    logits = lm_head(hidden[:, -1:])
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    present = []
    for layer in cache.layers:
        present += [layer.keys, layer.values]
    return (logits, *present)
