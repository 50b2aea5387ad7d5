"""SmolVLM / Idefics3: llama text GGUF + idefics3 mmproj (SigLIP tiles, pixel shuffle)."""

from __future__ import annotations

from edgevlm.export.gguf_export import text, vision
from edgevlm.export.gguf_export.source import prefix_renamer
from edgevlm.runtimes import families

SPEC = families.family("smolvlm")
ARCH = SPEC.gguf_text_arch
TEXT_RENAME = prefix_renamer([("model.text_model.", "model."), ("lm_head.", "lm_head.")])
VISION_RENAME = prefix_renamer([("model.vision_model.", "model.vision_model."),
                                ("model.connector.", "model.connector.")])


def text_arch(cfg: dict) -> str:
    return ARCH


def text_options(cfg: dict) -> text.TextOptions:
    return text.TextOptions(ARCH, permute_qk=True)


def text_extra_metadata(writer, cfg: dict) -> None:
    writer.add_rope_freq_base(text.rope_theta(cfg["text_config"]))


def check(cfg: dict) -> None:
    """Nothing llama.cpp would silently get wrong for this family."""


def mmproj(src, cfg: dict, proc: dict, folder, *, name: str, ftype: int):
    """(projector type, metadata writer, tensor jobs, io facts)."""
    vcfg = cfg["vision_config"]
    n_layers = int(vcfg["num_hidden_layers"])
    scale = int(cfg.get("scale_factor", 2))
    longest = int((proc.get("size") or {}).get("longest_edge", vcfg["image_size"]))

    def metadata(writer):
        vision.vision_metadata(writer, projector=SPEC.gguf_projector, vcfg=vcfg,
                               text_hidden=cfg["text_config"]["hidden_size"],
                               image_size=vcfg["image_size"], patch_size=vcfg["patch_size"],
                               n_layers=n_layers, proc=proc, name=name, ftype=ftype)
        writer.add_vision_projector_scale_factor(scale)
        writer.add_vision_preproc_image_size(longest)

    jobs = vision.mapped_jobs(src, n_layers)
    tokens = (vcfg["image_size"] // vcfg["patch_size"] // scale) ** 2
    return SPEC.gguf_projector, metadata, jobs, {"image_tokens_per_tile": tokens, "tile_size": vcfg["image_size"],
                                        "longest_edge": longest}
