"""Fallback decoder through torch.onnx, for families the builder's graph cannot express.

Gemma3 is the case: in prefill its image tokens attend to each other bidirectionally, which
the builder's causal GroupQueryAttention cannot do. This graph takes the attention biases as
inputs instead (`full_attention_bias`, `sliding_attention_bias`: additive, (1, 1, S, total),
computed on the host by `edgevlm.runtimes.ort_generate.gemma3_biases`), so the host decides
causality, the sliding window and the image blocks. Same I/O names as the builder's graph
otherwise; KV is not written in place (metadata `edgevlm.kv_in_place` = 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MASK_INPUTS = ("full_attention_bias", "sliding_attention_bias")


class BiasDecoder(nn.Module):
    """inputs_embeds, position_ids, two attention biases, *past -> last logits, *present."""

    def __init__(self, vlm):
        super().__init__()
        self.text = vlm.adapter.text_stack(vlm.model)
        self.lm_head = vlm.adapter.lm_head_module(vlm.model)
        self.softcap = getattr(vlm.config.get_text_config(), "final_logit_softcapping", None)
        self.n_layers = len(self.text.layers)

    def forward(self, inputs_embeds, position_ids, full_attention_bias, sliding_attention_bias, past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        masks = {"full_attention": full_attention_bias, "sliding_attention": sliding_attention_bias}
        out = self.text(inputs_embeds=inputs_embeds, attention_mask=masks, position_ids=position_ids,
                        past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state[:, -1:])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


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
    total = torch.export.Dim("total_sequence_length", min=1, max=1 << 18)
    past = tuple(torch.randn(1, kv, p, hd) for _ in range(2 * n))
    example = (torch.randn(1, s, int(text.hidden_size)), torch.arange(p, p + s)[None],
               torch.zeros(1, 1, s, s + p), torch.zeros(1, 1, s, s + p), past)
    names = ["inputs_embeds", "position_ids", *MASK_INPUTS]
    kv_names = [f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    out_names = ["logits"] + [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    dynamic = ({1: seq}, {1: seq}, {2: seq, 3: total}, {2: seq, 3: total},
               tuple({2: past_len} for _ in range(2 * n)))
    _export(BiasDecoder(vlm).eval(), example, path, names + kv_names, out_names, dynamic)
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {"edgevlm.kv_in_place": "0"})
    onnx.save(model, str(path))
    return {"inputs": names + kv_names, "outputs": out_names}
