"""LLaVA (CLIP + Llama/Qwen2 text): llama or qwen2 text GGUF + legacy-layout "mlp" mmproj.

The stock llama.cpp converter refuses HF LLaVA checkpoints; we write the legacy layout
clip.cpp still runs: CLIP blocks up to the feature layer, mm.0 / mm.2 projector."""

from __future__ import annotations

from edgevlm.errors import UnsupportedModelError
from edgevlm.export.gguf_export import text, vision
from edgevlm.export.gguf_export.source import LLAVA_STYLE_TEXT, LLAVA_STYLE_VISION, prefix_renamer
from edgevlm.runtimes import families

PROJECTOR = families.family("llava").gguf_projector
TEXT_RENAME = prefix_renamer(LLAVA_STYLE_TEXT)
VISION_RENAME = prefix_renamer(LLAVA_STYLE_VISION)


def text_arch(cfg: dict) -> str:
    kind = cfg["text_config"].get("model_type", "llama")
    archs = families.family("llava").gguf_text_archs
    if kind in archs:
        return archs[kind]
    raise UnsupportedModelError(f"LLaVA with a '{kind}' text model is not handled by the GGUF writer",
                                f"supported LLaVA text models: {', '.join(archs)}")


def text_options(cfg: dict) -> text.TextOptions:
    arch = text_arch(cfg)
    return text.TextOptions(arch, permute_qk=arch == "llama")


def text_extra_metadata(writer, cfg: dict) -> None:
    writer.add_rope_freq_base(text.rope_theta(cfg["text_config"]))


def feature_layer(cfg: dict) -> int:
    """The CLIP hidden-state index (0 = embeddings) the projector reads."""
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise UnsupportedModelError("LLaVA with several vision feature layers is not handled",
                                    "use a checkpoint with a single vision_feature_layer")
    n = int(cfg["vision_config"]["num_hidden_layers"])
    return n + 1 + layer if layer < 0 else layer


def check(cfg: dict) -> None:
    text_arch(cfg)
    feature_layer(cfg)
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UnsupportedModelError(
            "LLaVA with vision_feature_select_strategy='full' keeps the CLS token; llama.cpp's "
            "llava projector always drops it", "only 'default' LLaVA checkpoints can be exported")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise UnsupportedModelError(
            f"LLaVA projector activation '{cfg.get('projector_hidden_act')}': llama.cpp's mlp "
            "projector uses GELU", "only GELU projectors can be exported")
    if cfg["vision_config"].get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UnsupportedModelError("LLaVA with a non-CLIP vision tower is not handled",
                                    "only CLIP-based LLaVA checkpoints can be exported")


def mmproj(src, cfg: dict, proc: dict, folder, *, name: str, ftype: int):
    vcfg = cfg["vision_config"]
    layer = feature_layer(cfg)
    image = int(vcfg["image_size"])

    def metadata(writer):
        # Only the blocks before the feature layer are written; feature_layer marks the
        # last block's output as the features (no post-layernorm, as in HF LLaVA).
        vision.vision_metadata(writer, projector=PROJECTOR, vcfg=vcfg,
                               text_hidden=cfg["text_config"]["hidden_size"], image_size=image,
                               patch_size=vcfg["patch_size"], n_layers=layer, proc=proc,
                               name=name, ftype=ftype, eps=1e-5)
        writer.add_bool("clip.has_llava_projector", True)
        writer.add_array("clip.vision.feature_layer", [layer])
        writer.add_string("clip.vision.mm_patch_merge_type", "flat")

    prefix = "vision_tower.vision_model.encoder.layers."
    skip = {n.rpartition(".")[0] for n in src.names()
            if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) >= layer}
    skip.add("vision_tower.vision_model.post_layernorm")
    overrides = {"multi_modal_projector.linear_1": "mm.0", "multi_modal_projector.linear_2": "mm.2"}
    jobs = vision.mapped_jobs(src, layer, overrides, skip=skip)
    tokens = (image // vcfg["patch_size"]) ** 2
    return PROJECTOR, metadata, jobs, {"image_tokens": tokens, "image_size": image,
                                       "feature_layer": layer}
