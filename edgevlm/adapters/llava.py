"""LLaVA-1.5 style: CLIP vision tower, 2-layer MLP projector, Llama or Qwen2 text."""

from edgevlm.adapters import register
from edgevlm.adapters.base import ArchAdapter

LLAVA = register(
    ArchAdapter(
        family="llava",
        model_types=("llava",),
        hf_class="LlavaForConditionalGeneration",
        text_model="model.language_model",
        vision_tower="model.vision_tower",
        projector="model.multi_modal_projector",
        image_token_keys=("image_token_id", "image_token_index"),
        per_layer_config_keys=("layer_types",),
        processor_class="LlavaProcessor",
        gguf_text_arch="llama",  # or qwen2, by text_config.model_type
        gguf_projector="mlp",
        notes="CLIP feature layer from config.vision_feature_layer",
    )
)
