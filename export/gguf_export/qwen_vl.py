"""Qwen2-VL / Qwen2.5-VL: qwen2vl text GGUF (M-RoPE) + qwen2vl_merger / qwen2.5vl_merger mmproj.

llama.cpp's Qwen vision graph wants separate q/k/v tensors (HF fuses them as `qkv`) and the
Conv3d patch embedding (temporal patch 2) as two 2-D kernels, `v.patch_embd.weight` and
`v.patch_embd.weight.1`, which it applies to the same still image and adds."""

from __future__ import annotations

from edgevlm.errors import UnsupportedModelError
from edgevlm.export.gguf_export import text, vision
from edgevlm.export.gguf_export.source import prefix_renamer
from edgevlm.export.gguf_export.writer import TensorJob
from edgevlm.runtimes import families

ARCH = families.family("qwen2-vl").gguf_text_arch  # Qwen2.5-VL text: the same arch
TEXT_RENAME = prefix_renamer([
    ("model.language_model.", "model."), ("model.layers.", "model.layers."),
    ("model.embed_tokens.", "model.embed_tokens."), ("model.norm.", "model.norm."),
    ("lm_head.", "lm_head."),
])
VISION_RENAME = prefix_renamer([("model.visual.", "visual."), ("visual.", "visual.")])
# llama.cpp's qwen2.5vl graph uses this window when clip.vision.window_size is absent.
LLAMA_CPP_DEFAULT_WINDOW = 112


def _is_25(cfg: dict) -> bool:
    return families.for_config(cfg).name == "qwen2.5-vl"


def text_arch(cfg: dict) -> str:
    return ARCH


def text_options(cfg: dict) -> text.TextOptions:
    return text.TextOptions(ARCH)


def mrope_sections(tcfg: dict) -> list[int]:
    """HF mrope_section (t, h, w rotary pairs) padded to the 4 entries llama.cpp reads."""
    params = tcfg.get("rope_parameters") or tcfg.get("rope_scaling") or {}
    sections = [int(s) for s in params.get("mrope_section") or []]
    half = text.head_dim(tcfg) // 2
    if not sections or len(sections) > 4 or sum(sections) != half:
        raise UnsupportedModelError(
            f"Qwen-VL text config has mrope_section {sections or None}; llama.cpp's qwen2vl arch "
            f"needs up to 4 sections summing to head_dim/2 = {half}",
            "only checkpoints with a standard M-RoPE configuration can be exported")
    return sections + [0] * (4 - len(sections))


def text_extra_metadata(writer, cfg: dict) -> None:
    tcfg = cfg["text_config"]
    writer.add_rope_freq_base(text.rope_theta(tcfg))
    writer.add_rope_dimension_sections(mrope_sections(tcfg))


def wa_pattern(vcfg: dict) -> int:
    """llama.cpp's n_wa_pattern: block il attends globally iff (il + 1) % n == 0."""
    full = sorted(int(i) for i in vcfg.get("fullatt_block_indexes") or [])
    depth = int(vcfg["depth"])
    n = full[0] + 1 if full else 0
    if not n or full != [i for i in range(depth) if (i + 1) % n == 0]:
        raise UnsupportedModelError(
            f"Qwen2.5-VL vision fullatt_block_indexes {full} (depth {depth}) are not periodic; "
            "llama.cpp only expresses 'every n-th block is global' (clip.vision.n_wa_pattern)",
            "this vision tower cannot be exported to GGUF")
    return n


def check(cfg: dict) -> None:
    """Refuse what llama.cpp's qwen2vl text arch or Qwen vision graph would get wrong."""
    tcfg, vcfg = cfg["text_config"], cfg["vision_config"]
    mrope_sections(tcfg)
    params = tcfg.get("rope_parameters") or {}
    if params.get("rope_type", "default") not in ("default", "mrope"):
        raise UnsupportedModelError(
            f"Qwen-VL text rope_type '{params.get('rope_type')}' is not written by the GGUF writer",
            "only default (unscaled) M-RoPE checkpoints can be exported")
    if tcfg.get("use_sliding_window"):
        raise UnsupportedModelError("Qwen-VL with use_sliding_window=true: llama.cpp's qwen2vl "
                                    "arch has no sliding-window attention",
                                    "export a checkpoint with use_sliding_window=false")
    if int(vcfg.get("temporal_patch_size", 2)) != 2 or int(vcfg.get("spatial_merge_size", 2)) != 2:
        raise UnsupportedModelError(
            "Qwen-VL vision with temporal_patch_size "
            f"{vcfg.get('temporal_patch_size')} / spatial_merge_size {vcfg.get('spatial_merge_size')}: "
            "llama.cpp's graph is fixed at 2 / 2", "this vision tower cannot be exported to GGUF")
    if _is_25(cfg):
        wa_pattern(vcfg)
        window = int(vcfg.get("window_size", LLAMA_CPP_DEFAULT_WINDOW))
        if window != LLAMA_CPP_DEFAULT_WINDOW:
            raise UnsupportedModelError(
                f"Qwen2.5-VL vision window_size {window}: this llama.cpp build always attends "
                f"in {LLAMA_CPP_DEFAULT_WINDOW}-pixel windows (it ignores "
                "clip.vision.window_size), so the image features would be silently wrong",
                f"export a checkpoint with window_size {LLAMA_CPP_DEFAULT_WINDOW} (every "
                "released Qwen2.5-VL has it), or export to ONNX instead")


def _vision_dims(cfg: dict) -> tuple[int, int]:
    """(vision width, MLP width): Qwen2-VL names them embed_dim / embed_dim * mlp_ratio."""
    vcfg = cfg["vision_config"]
    if _is_25(cfg):
        return int(vcfg["hidden_size"]), int(vcfg["intermediate_size"])
    width = int(vcfg["embed_dim"])
    return width, int(width * float(vcfg.get("mlp_ratio", 4)))


def _slice_loader(src, name, index):
    def load():
        return src.get(name)[index]
    return load


def _split_jobs(src, n_blocks: int) -> tuple[list[TensorJob], set[str]]:
    """q/k/v out of each fused qkv, and the two temporal halves of the Conv3d patch kernel."""
    from gguf import MODEL_ARCH, TensorNameMap

    names = TensorNameMap(MODEL_ARCH.MMPROJ, n_blocks)
    jobs, handled = [], set()
    for name in src.names():
        base, _, suffix = name.rpartition(".")
        shape = src.shape(name)
        if base.endswith(".attn.qkv"):
            width = shape[0] // 3
            for k, part in enumerate("qkv"):
                gguf = names.get_name(f"{base[:-3]}{part}")
                jobs.append(TensorJob(f"{gguf}.{suffix}", (width, *shape[1:]),
                                      _slice_loader(src, name, slice(k * width, (k + 1) * width)),
                                      keep_f32=len(shape) == 1))
            handled.add(name)
        elif base == "visual.patch_embed.proj":
            out, chans, _t, kh, kw = shape
            for t, gguf in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1")):
                jobs.append(TensorJob(gguf, (out, chans, kh, kw),
                                      _slice_loader(src, name, (slice(None), slice(None), t)),
                                      keep_f32=True))
            handled.add(name)
    return jobs, handled


def mmproj(src, cfg: dict, proc: dict, folder, *, name: str, ftype: int):
    """(projector type, metadata writer, tensor jobs, io facts)."""
    vcfg = cfg["vision_config"]
    n_layers = int(vcfg["depth"])
    width, ffn = _vision_dims(cfg)
    projector = families.for_config(cfg).gguf_projector
    patch = int(vcfg.get("patch_size", 14))

    def metadata(writer):
        # image_size is nominal: llama.cpp sizes Qwen images itself (multiples of 2 patches).
        vision.vision_metadata(writer, projector=projector, vcfg=vcfg,
                               text_hidden=cfg["text_config"]["hidden_size"], image_size=560,
                               patch_size=patch, n_layers=n_layers, proc=proc, name=name,
                               ftype=ftype, n_embd=width, n_head=int(vcfg["num_heads"]), n_ff=ffn,
                               eps=1e-6)
        writer.add_vision_spatial_merge_size(int(vcfg.get("spatial_merge_size", 2)))
        if _is_25(cfg):
            writer.add_vision_n_wa_pattern(wa_pattern(vcfg))
            writer.add_vision_window_size(int(vcfg.get("window_size", LLAMA_CPP_DEFAULT_WINDOW)))

    split, handled = _split_jobs(src, n_layers)
    jobs = split + vision.mapped_jobs(src, n_layers, skip=handled)
    return projector, metadata, jobs, {"patch_size": patch, "merge_size": 2,
                                       "window_size": vcfg.get("window_size")}
