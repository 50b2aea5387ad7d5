"""SmolVLM / Idefics3: SigLIP tiles + pixel shuffle connector, Llama text."""

from edgevlm.adapters import register
from edgevlm.adapters.base import ArchAdapter

SMOLVLM = register(
    ArchAdapter(
        family="smolvlm",
        model_types=("smolvlm", "idefics3"),
        hf_class="SmolVLMForConditionalGeneration",
        text_model="model.text_model",
        vision_tower="model.vision_model",
        projector="model.connector",
        image_token_keys=("image_token_id",),
        per_layer_config_keys=("layer_types",),
        processor_class="SmolVLMProcessor",
        gguf_text_arch="llama",
        gguf_projector="idefics3",
        notes="image splitting into tiles + global image, pixel shuffle",
    )
)
