"""The KV-cache decoder through onnxruntime-genai's model builder.

Measured here: the builder's graph (GroupQueryAttention with fused rotary, packed QKV,
SkipSimplifiedLayerNormalization) decodes ~3x faster at 512 cached tokens than a torch.onnx
export with unfused attention, and builds in seconds. We build from a text-only folder
(`textckpt`) with `exclude_embeds` (the VLM merges image features into the embeddings) and
`prune_lm_head` (logits for the last position only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import EdgeVLMError, require
from edgevlm.ui import quieted

# edgevlm quant name -> builder precision
BUILDER_PRECISION = {"none": "fp32", "int8": "int8", "q4": "int4"}


@dataclass
class BuiltDecoder:
    """One built decoder graph (model.onnx + model.onnx.data + genai_config.json)."""

    folder: Path
    precision: str

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"


def build_decoder(text_dir: Path, out_dir: Path, cache_dir: Path, quant: str = "none",
                  *, int4_block_size: int = 32, int4_accuracy_level: int = 4,
                  lm_head_8bit: bool = False) -> BuiltDecoder:
    """Run the builder on a text-only folder; its console chatter is captured, and shown only
    if it fails."""
    require("onnxruntime_genai", "onnx", "building the ONNX decoder", package="onnxruntime-genai")
    from onnxruntime_genai.models import builder

    precision = BUILDER_PRECISION[quant]
    # windowed_kv_cache=false: sliding-window layers (Gemma3) keep an ordinary full-length cache
    # (GroupQueryAttention still masks to the window), so every layer shares one KV layout
    # and the reference loop's single preallocated buffer per layer works for all of them.
    # shared_embeddings=false: the embedding table is not in the graph (exclude_embeds), so
    # tying it to lm_head only makes the quantizer try (and log failing) to quantize a Gather.
    options = ["exclude_embeds=true", "prune_lm_head=true", "windowed_kv_cache=false",
               "shared_embeddings=false"]
    if precision == "int4":
        options += [f"int4_block_size={int4_block_size}",
                    f"int4_accuracy_level={int4_accuracy_level}"]
        if lm_head_8bit:
            options.append("int4_nodes_to_exclude=/lm_head/MatMul")
    # Its quantizer logs every node at INFO through its own handler; its from_pretrained of
    # the text folder reports the (unused) vision weights as missing.
    with quieted(logs=logging.INFO, stdout=True, stderr=True, transformers=True) as log:
        try:
            opts = builder.parse_extra_options(None, str(text_dir), str(out_dir), precision, "cpu",
                                               str(cache_dir), options)
            _patch_config(opts["hf_details"]["hf_config"])
            builder.create_model(None, str(text_dir), str(out_dir), precision, "cpu",
                                 str(cache_dir), **opts)
        except Exception as exc:
            tail = "\n".join(log.getvalue().splitlines()[-15:])
            raise EdgeVLMError(f"onnxruntime-genai's model builder failed ({precision}): "
                               f"{type(exc).__name__}: {exc}\n{tail}",
                               "report it with the model's config.json") from exc
    _fix_kv_dims(Path(out_dir) / "model.onnx", Path(text_dir) / "config.json")
    return BuiltDecoder(folder=Path(out_dir), precision=precision)


def _fix_kv_dims(model_path: Path, config_path: Path) -> None:
    """The builder names the KV head size `kv_cache_dim`; transformers.js makes its empty
    first-step cache from the declared shape (every named dim but batch_size -> 0), so the size
    must be a number there."""
    import json

    import onnx

    config = json.loads(config_path.read_text())
    text = config.get("text_config", config)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    model = onnx.load(str(model_path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "kv_cache_dim":
                dim.dim_value = head_dim
    onnx.save(model, str(model_path))


def _patch_config(config) -> None:
    """transformers 5 keeps Gemma3's RoPE per layer type; the builder reads the flat form
    (global theta in rope_parameters, local theta in rope_local_base_freq)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "rope_type" not in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
