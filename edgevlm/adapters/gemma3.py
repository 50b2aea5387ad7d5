"""Gemma 3: SigLIP vision, pooled soft-token projector, Gemma3 text with 5:1 local/global attention."""

from edgevlm.adapters import register
from edgevlm.adapters.base import ArchAdapter

GEMMA3 = register(
    ArchAdapter(
        family="gemma3",
        model_types=("gemma3",),
        hf_class="Gemma3ForConditionalGeneration",
        text_model="model.language_model",
        vision_tower="model.vision_tower",
        projector="model.multi_modal_projector",
        image_token_keys=("image_token_id", "image_token_index"),
        per_layer_config_keys=("layer_types",),
        processor_class="Gemma3Processor",
        layer_period=6,
        gguf_text_arch="gemma3",
        gguf_projector="gemma3",
        notes="sliding-window period 6: pruning must keep it or is refused",
    )
)
