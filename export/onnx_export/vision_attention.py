"""Vision-tower attention exported as onnxruntime's fused `com.microsoft.MultiHeadAttention`.

torch.onnx decomposes scaled_dot_product_attention into MatMul, Add (mask), Softmax and a
NaN guard (IsNaN / Where), each a (heads, patches, patches) fp32 tensor: at SigLIP's 1024
patches per 512 px tile that is 50 MB per tensor, five to six of them live per layer. With
no mask and no bias, onnxruntime's CPU MultiHeadAttention runs MLAS flash attention: the
scores are computed in L2-sized blocks and never materialised, which is the point.

The towers exported this way attend over every patch of an image with no mask in real use:
CLIP (LLaVA) and SigLIP (Gemma 3) always, and Idefics3 (SmolVLM) because its processor
resizes an image to whole tiles, so every tile's patch mask is all ones (a partial tile,
which no processor makes, would also attend to its padding patches; its positions still
come from the mask). Qwen's block-windowed attention keeps the decomposed form.
"""

import contextlib

import torch


def _fused_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **_):
    """transformers' attention-interface signature: (B, heads, S, D) each -> (B, S, heads, D).
    The mask is dropped (see the module doc)."""
    batch, heads, length, dim = query.shape
    scale = float(scaling) if scaling is not None else dim ** -0.5
    if not torch.onnx.is_in_onnx_export():
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
        return out.transpose(1, 2), None
    # All three as (B, S, heads * D): with key and value in (B, heads, S, D) the op takes its
    # cross-attention path, which materialises the scores.
    packed = [t.transpose(1, 2).reshape(batch, t.shape[2], heads * t.shape[3]) for t in (query, key, value)]
    out = torch.onnx.ops.symbolic("com.microsoft::MultiHeadAttention", packed,
                                  {"num_heads": int(heads), "scale": scale},
                                  dtype=query.dtype, shape=packed[0].shape, version=1)
    return out.reshape(batch, length, heads, dim), None


@contextlib.contextmanager
def fused_vision_attention(vision_config):
    """Within the block, the tower's attention (its configured implementation) is the fused op."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(vision_config, "_attn_implementation", None) or "sdpa"
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    had, previous = name in mapping, mapping.get(name)
    mapping[name] = _fused_attention
    try:
        yield
    finally:
        if had:
            mapping[name] = previous
        else:
            del mapping[name]
