"""Qwen2-VL and Qwen2.5-VL: ViT with 2x2 patch merger, Qwen2 text with M-RoPE."""

from edgevlm.adapters import register
from edgevlm.adapters.base import ArchAdapter

COMMON = dict(
    text_model="model.language_model",
    vision_tower="model.visual",
    projector="model.visual.merger",
    image_token_keys=("image_token_id",),
    per_layer_config_keys=("layer_types",),
    gguf_text_arch="qwen2vl",
    notes="M-RoPE: 3-D position ids (rope.dimension_sections)",
)

QWEN2_VL = register(
    ArchAdapter(
        family="qwen2-vl",
        model_types=("qwen2_vl",),
        hf_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        gguf_projector="qwen2vl_merger",
        **COMMON,
    )
)

QWEN2_5_VL = register(
    ArchAdapter(
        family="qwen2.5-vl",
        model_types=("qwen2_5_vl",),
        hf_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        gguf_projector="qwen2.5vl_merger",
        **COMMON,
    )
)
