"""The family table: every fact edgevlm knows about a VLM family, as data, in one place.

Torch-free (stdlib only) so a device install reads it too. Adapters (edgevlm.adapters),
both exporters, both runners, the preprocessors, `inspect` and `list` look facts up here;
adding a family is one entry below plus its tiny factory (edgevlm/tiny) and its code.
In the spirit of gguf-py's tensor maps: the table is the data, the helpers only read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# ONNX graph file suffix per quantization (the transformers.js / onnx-community layout).
ONNX_SUFFIX = {"none": "", "int8": "_quantized", "q4": "_q4"}
# config.json keys that may hold the id whose positions receive image features, in order.
IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")


@dataclass(frozen=True)
class Family:
    """One VLM family. Paths are dotted attribute paths from the top-level
    *ForConditionalGeneration module (transformers 5)."""

    name: str  # edgevlm's family name, e.g. "qwen2-vl"
    model_types: tuple[str, ...]  # config.json model_type values of this family
    hf_class: str  # transformers model class
    processor_class: str  # transformers processor class (processor_config.json)
    text_model: str  # decoder stack owner (has .layers, .norm, .embed_tokens)
    vision_tower: str
    projector: str
    vision_layers: str  # the vision tower's block list, relative to vision_tower
    # Tokens: config attributes holding image token ids; the token whose positions take the
    # image features; the text the chat template writes for one image (expanded later).
    image_token_keys: tuple[str, ...]
    image_token: str
    placeholder: str
    # GGUF (llama.cpp): text arch (LLaVA: by its text model, see gguf_text_archs), mmproj
    # projector type, writer module under edgevlm.export.gguf_export, tokenizer model.
    gguf_text_arch: str
    gguf_projector: str
    gguf_writer: str
    gguf_tokenizer: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) / "llama" (SentencePiece)
    # What the chat template writes for one image, which the llama.cpp runner replaces by
    # mtmd's marker (mtmd adds the family's own wrapper tokens around the embeddings); and the
    # text the HF processor writes around an image that mtmd's wrapper leaves out.
    gguf_image_text: str
    gguf_around_image: tuple[str, str] = ("", "")
    # ONNX (transformers.js layout): vision-encoder input names, first position id.
    onnx_vision_inputs: tuple[str, ...] = ("pixel_values",)
    onnx_position_start: int = 0
    # The vision tower attends over all of an image's patches, unmasked, in real use: exported
    # as onnxruntime's fused attention (export/onnx_export/vision_attention.py). Qwen's
    # windowed blocks are not.
    onnx_fused_vision_attention: bool = True
    # text_config.model_type -> GGUF text arch, for families whose text model varies.
    gguf_text_archs: Mapping[str, str] = field(default_factory=dict)
    per_layer_config_keys: tuple[str, ...] = ("layer_types",)  # text-config lists sliced on prune
    layer_period: int | None = None  # local/global attention period that pruning must keep
    mrope: bool = False  # 3-D (temporal, height, width) rotary positions
    # Prefill attends bidirectionally among one image's tokens (not causally).
    bidirectional_images: bool = False
    targets: tuple[str, ...] = ("onnx", "gguf")
    # target -> a defect of that runtime's build for this family (said when verification fails).
    known_defects: Mapping[str, str] = field(default_factory=dict)
    # A defect of this llama.cpp build that GGUF verification detects and works around, so it
    # never fails an export (not in known_defects): the text arch's RMSNorm runs without its
    # epsilon ({arch}.attention.layer_norm_rms_epsilon ignored). Detected, PyTorch with eps 0
    # is the reference; not detected, f32 text logits are held to gguf_f32_logits_tol.
    gguf_rms_eps_ignored: bool = False
    gguf_f32_logits_tol: float | None = None
    notes: str = ""


_QWEN = dict(
    text_model="model.language_model", vision_tower="model.visual",
    projector="model.visual.merger", vision_layers="blocks",
    image_token_keys=("image_token_id",), image_token="<|image_pad|>", placeholder="<|image_pad|>",
    gguf_text_arch="qwen2vl", gguf_writer="qwen_vl", gguf_tokenizer="gpt2", mrope=True,
    gguf_rms_eps_ignored=True, gguf_f32_logits_tol=1e-2,
    onnx_fused_vision_attention=False,
    gguf_image_text="<|vision_start|><|image_pad|><|vision_end|>",
    notes="M-RoPE: 3-D position ids (rope.dimension_sections)",
)

# In registration order (`edgevlm list families`).
TABLE: tuple[Family, ...] = (
    Family(
        name="gemma3", model_types=("gemma3",), hf_class="Gemma3ForConditionalGeneration",
        processor_class="Gemma3Processor", text_model="model.language_model",
        vision_tower="model.vision_tower", projector="model.multi_modal_projector",
        vision_layers="encoder.layers",
        image_token_keys=("image_token_id", "image_token_index"),
        image_token="<image_soft_token>", placeholder="<start_of_image>",
        gguf_text_arch="gemma3", gguf_projector="gemma3", gguf_writer="gemma3",
        gguf_tokenizer="llama", gguf_image_text="<start_of_image>",
        # Gemma3Processor expands <start_of_image> to "\n\n<start_of_image>" + soft tokens +
        # "<end_of_image>\n\n"; mtmd adds only the two image tokens.
        gguf_around_image=("\n\n", "\n\n"),
        # transformers.js counts Gemma 3's positions from 1 (rotary: only differences matter).
        onnx_position_start=1,
        bidirectional_images=True,
        layer_period=6,
        notes="sliding-window period 6: pruning must keep it or is refused"),
    Family(
        name="llava", model_types=("llava",), hf_class="LlavaForConditionalGeneration",
        processor_class="LlavaProcessor", text_model="model.language_model",
        vision_tower="model.vision_tower", projector="model.multi_modal_projector",
        vision_layers="encoder.layers",
        image_token_keys=("image_token_id", "image_token_index"), image_token="<image>",
        placeholder="<image>", gguf_text_arch="llama", gguf_projector="mlp", gguf_writer="llava",
        gguf_tokenizer="llama", gguf_image_text="<image>",
        gguf_text_archs={"llama": "llama", "mistral": "llama", "qwen2": "qwen2"},
        known_defects={
            "gguf": "llama.cpp's llava graph (tools/mtmd/models/llava.cpp) concatenates the CLIP "
                    "class token AFTER the patches while positions and the patch selection still "
                    "assume it first, so this llama.cpp build computes shifted image features for "
                    "every CLIP LLaVA; the mmproj file itself is correct"},
        notes="CLIP feature layer from config.vision_feature_layer"),
    Family(
        name="qwen2-vl", model_types=("qwen2_vl",), hf_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor", gguf_projector="qwen2vl_merger",
        onnx_vision_inputs=("pixel_values", "grid_thw"), **_QWEN),
    Family(
        name="qwen2.5-vl", model_types=("qwen2_5_vl",),
        hf_class="Qwen2_5_VLForConditionalGeneration", processor_class="Qwen2_5_VLProcessor",
        gguf_projector="qwen2.5vl_merger", onnx_vision_inputs=("pixel_values", "image_grid_thw"),
        **_QWEN),
    Family(
        name="smolvlm", model_types=("smolvlm", "idefics3"),
        hf_class="SmolVLMForConditionalGeneration", processor_class="SmolVLMProcessor",
        text_model="model.text_model", vision_tower="model.vision_model",
        projector="model.connector", vision_layers="encoder.layers",
        image_token_keys=("image_token_id",), image_token="<image>", placeholder="<image>",
        gguf_text_arch="llama", gguf_projector="idefics3", gguf_writer="smolvlm",
        gguf_tokenizer="gpt2", gguf_image_text="<image>",
        onnx_vision_inputs=("pixel_values", "pixel_attention_mask"),
        notes="image splitting into tiles + global image, pixel shuffle"),
)

FAMILIES: dict[str, Family] = {f.name: f for f in TABLE}
_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in TABLE for t in f.model_types}


def family(name: str) -> Family:
    """The table entry of a family name (KeyError names the known ones)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family '{name}' (known: {', '.join(FAMILIES)})") from None


def for_model_type(model_type: str | None) -> Family | None:
    """The family whose model_types include `model_type`, or None."""
    return _BY_MODEL_TYPE.get(model_type or "")


def for_config(config: Mapping | object) -> Family | None:
    """The family of a config.json dict or a transformers config object, or None."""
    get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    return for_model_type(get("model_type"))


def supported() -> str:
    """'family (model_type/...)' for every family, for error messages."""
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in TABLE)


def image_token_id(config: Mapping, keys: tuple[str, ...] = IMAGE_TOKEN_KEYS) -> int | None:
    """The image token id of a config.json dict (top level first, then text_config)."""
    for source in (config, config.get("text_config") or {}):
        for key in keys:
            if source.get(key) is not None:
                return int(source[key])
    return None


def onnx_graph(stem: str, quant: str = "none") -> str:
    """File name of an ONNX graph at a quantization: ('decoder_model_merged', 'q4') ->
    'decoder_model_merged_q4.onnx'."""
    return f"{stem}{ONNX_SUFFIX[quant]}.onnx"


def user_turn(prompt: str, num_images: int = 1) -> list[dict]:
    """The chat messages of one user turn: `num_images` images, then the prompt."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]
