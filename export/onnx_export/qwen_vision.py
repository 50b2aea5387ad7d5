"""Qwen2-VL / Qwen2.5-VL vision tower as an exportable graph with transformers.js' inputs.

transformers.js feeds `pixel_values` (N, C*T*P*P) and the grid (num_images, 3) as `grid_thw`
(Qwen2-VL) or `image_grid_thw` (Qwen2.5-VL). The stock forward derives per-patch rotary
positions, `cu_seqlens` and (2.5) the window order from the grid with Python loops, which
dynamo refuses; here they are elementwise tensor ops on the grid's values, so one graph serves
any image size and several images:

- each patch's image, frame and (row, column) come from its index and the grid (patches are in
  merge-window order: frame, merged row, merged column, row in unit, column in unit);
- attention is one SDPA with an additive bias: 0 between patches of the same frame (stock
  `cu_seqlens`), and for Qwen2.5-VL's windowed blocks of the same frame and window;
- Qwen2.5-VL's window reordering is left out: every op but attention is per patch (per merge
  unit for the merger) and attention restricted to a window by the bias is the same whether
  the window's patches are contiguous or not, so the stock permute / un-permute cancel out.
"""

from __future__ import annotations

import torch
from torch import nn


class QwenVision(nn.Module):
    """pixel_values (N, C*T*P*P), grid (num_images, 3) int64 -> image_features (N/4, hidden)."""

    def __init__(self, visual, window_size: int, patch_size: int):
        super().__init__()
        self.visual = visual
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.full_blocks = set(getattr(visual, "fullatt_block_indexes", []) or [])
        self.merge = int(visual.spatial_merge_size)
        # Qwen2.5-VL: merged units per window side.
        self.window = window_size // self.merge // patch_size if self.windowed else 0

    def forward(self, pixel_values, grid):
        v = self.visual
        frame, row, col, window = self.layout(grid, pixel_values.shape[0])
        hidden = v.patch_embed(pixel_values)
        cos, sin = v.rotary_pos_emb(hidden, torch.stack([row, col], dim=-1))
        full = _bias(hidden.dtype, frame)
        local = _bias(hidden.dtype, frame, window) if self.windowed else full
        for i, block in enumerate(v.blocks):
            bias = full if (not self.windowed or i in self.full_blocks) else local
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, bias)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return v.merger(hidden)

    def layout(self, grid, n):
        """Per patch: frame id (over all images), row, column, window id within its frame."""
        t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
        ends = torch.cumsum(t * h * w, 0)
        index = torch.arange(n, dtype=grid.dtype, device=grid.device)
        image = (index[:, None] >= ends[None, :]).sum(1)
        local = index - (ends - t * h * w)[image]
        hi, wi = h[image], w[image]
        frame_size = hi * wi
        m = self.merge
        unit, within = (local % frame_size) // (m * m), local % (m * m)
        unit_row, unit_col = unit // (wi // m), unit % (wi // m)
        frame = (torch.cumsum(t, 0) - t)[image] + local // frame_size
        row, col = unit_row * m + within // m, unit_col * m + within % m
        window = torch.zeros_like(frame)
        if self.windowed:
            window = (unit_row // self.window) * (wi // m) + unit_col // self.window
        return frame, row, col, window

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


def _bias(dtype, *segments):
    """Additive attention bias (1, 1, N, N): 0 between patches equal in every segment id, the
    dtype's minimum elsewhere."""
    same = segments[0][:, None] == segments[0][None, :]
    for segment in segments[1:]:
        same = same & (segment[:, None] == segment[None, :])
    zero = torch.zeros((), dtype=dtype)
    return torch.where(same, zero, torch.finfo(dtype).min)[None, None]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qwen_vision_wrapper(vlm):
    """(wrapper, input names, example inputs, dynamic shapes): two example images."""
    vcfg = vlm.config.vision_config
    merge = int(vcfg.spatial_merge_size)
    patch_dim = int(vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2)
    grid = torch.tensor([[1, 2 * merge, 2 * merge], [1, 2 * merge, 3 * merge]], dtype=torch.int64)
    n = int((grid[:, 1] * grid[:, 2]).sum())
    wrapper = QwenVision(vlm.model.model.visual, int(getattr(vcfg, "window_size", 0) or 0),
                         int(vcfg.patch_size))
    names = list(vlm.adapter.onnx_vision_inputs)  # transformers.js names (Qwen2-VL: grid_thw)
    patches = torch.export.Dim("num_patches", min=4, max=1 << 16)
    images = torch.export.Dim("num_images", min=1, max=256)
    example = (torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(0)), grid)
    return wrapper, names, example, ({0: patches}, {0: images})
