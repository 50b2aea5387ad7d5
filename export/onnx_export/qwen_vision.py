"""Qwen2-VL / Qwen2.5-VL vision tower as an exportable graph.

The stock forward derives per-image position ids, `cu_seqlens` and (2.5) the window order
from `grid_thw` with Python loops and a data-dependent split, which dynamo refuses and the
legacy exporter bakes in as constants. Here those come from the host as inputs
(`edgevlm.runtimes.ort_generate.qwen_vision_inputs`) and attention is one masked SDPA with a
block-diagonal additive bias, so one graph serves any image size and several images.
"""

from __future__ import annotations

import torch
from torch import nn


class QwenVision(nn.Module):
    """patches (N, C*T*P*P), vision_position_ids (N, 2), attention_bias (1, 1, N, N)
    [+ window_index (N/4,), window_reverse_index (N/4,), window_bias] -> (N/4, hidden)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.full_blocks = set(getattr(visual, "fullatt_block_indexes", []) or [])
        self.unit = visual.spatial_merge_size ** 2

    def forward(self, pixel_values, vision_position_ids, attention_bias, window_index=None,
                window_reverse_index=None, window_bias=None):
        v = self.visual
        hidden = v.patch_embed(pixel_values)
        cos, sin = v.rotary_pos_emb(hidden, vision_position_ids)
        if self.windowed:
            hidden, cos, sin = (self._permute(t, window_index) for t in (hidden, cos, sin))
        for i, block in enumerate(v.blocks):
            bias = attention_bias if (not self.windowed or i in self.full_blocks) else window_bias
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, bias)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = v.merger(hidden)
        if self.windowed:
            merged = merged[window_reverse_index]
        return merged

    def _permute(self, t, index):
        n = t.shape[0]
        return t.reshape(n // self.unit, self.unit, -1)[index].reshape(n, -1)

    @staticmethod
    def _attention(attn, x, cos, sin, bias):
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                               scale=attn.scaling)
        return attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qwen_vision_wrapper(vlm):
    """(wrapper, input names, example inputs, dynamic shapes) built from a real host
    preprocessing of two example images, so the example is consistent."""
    import numpy as np

    from edgevlm.runtimes.ort_generate import qwen_vision_inputs

    visual = vlm.model.model.visual
    cfg = vlm.config.to_dict()
    vcfg = vlm.config.vision_config
    merge = int(vcfg.spatial_merge_size)
    patch_dim = int(vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2)
    grid = np.array([[1, 2 * merge, 2 * merge], [1, 2 * merge, 3 * merge]], dtype=np.int64)
    n = int((grid[:, 1] * grid[:, 2]).sum())
    feeds = qwen_vision_inputs(cfg, np.random.default_rng(0).standard_normal((n, patch_dim)), grid)
    wrapper = QwenVision(visual)
    names = ["pixel_values", "vision_position_ids", "attention_bias"]
    if wrapper.windowed:
        names += ["window_index", "window_reverse_index", "window_bias"]
    example = tuple(torch.from_numpy(feeds[k]) for k in names)
    patches = torch.export.Dim("num_patches", min=4, max=1 << 16)
    merged = torch.export.Dim("num_merged", min=1, max=1 << 14)
    dyn = [{0: patches}, {0: patches}, {2: patches, 3: patches}]
    if wrapper.windowed:
        dyn += [{0: merged}, {0: merged}, {2: patches, 3: patches}]
    return wrapper, names, example, tuple(dyn)
