"""Gemma 3: gemma3 text GGUF + gemma3 mmproj (SigLIP, average-pooled soft tokens).

llama.cpp hard-codes parts of Gemma 3 that HF keeps in config.json: which layers are global
(every 6th, derived from the layer index), the local rope base (10000) and the query scale
(1/sqrt(head_dim), or 1/sqrt(hidden/heads) when the model has exactly 62 layers, its
"27B"). A checkpoint that disagrees is refused, not written to run silently wrong."""

from __future__ import annotations

import math

from edgevlm.errors import UnsupportedModelError, UsageError
from edgevlm.export.gguf_export import text, vision
from edgevlm.export.gguf_export.source import LLAVA_STYLE_TEXT, LLAVA_STYLE_VISION, prefix_renamer
from edgevlm.runtimes import families

SPEC = families.family("gemma3")
ARCH = SPEC.gguf_text_arch
PERIOD = SPEC.layer_period  # llama.cpp hard-codes 6: layer il is global iff (il + 1) % 6 == 0
LLAMA_CPP_SWA_ROPE_THETA = 10000.0
LLAMA_CPP_27B_LAYERS = 62  # llama.cpp infers "27B" (and its query scale) from this count

TEXT_RENAME = prefix_renamer(LLAVA_STYLE_TEXT)
_VISION_PREFIXES = prefix_renamer(LLAVA_STYLE_VISION, skip=(
    "vision_tower.vision_model.head.", "model.vision_tower.vision_model.head."))


def _vision_rename(raw: str) -> str | None:
    name = _VISION_PREFIXES(raw)
    # a bare parameter in HF; give it a .weight suffix so TensorNameMap maps it
    if name == "multi_modal_projector.mm_input_projection_weight":
        return "multi_modal_projector.mm_input_projection.weight"
    return name


VISION_RENAME = _vision_rename


def text_arch(cfg: dict) -> str:
    return ARCH


def text_options(cfg: dict) -> text.TextOptions:
    # Gemma RMSNorm scales by (1 + w); llama.cpp by w.
    return text.TextOptions(ARCH, norm_plus_one=True)


def _rope(tcfg: dict, layer_type: str) -> dict:
    params = tcfg.get("rope_parameters") or {}
    return params.get(layer_type) or params


def llama_cpp_layer_types(n_layers: int) -> list[str]:
    """The attention type llama.cpp gives each layer of a gemma3 GGUF."""
    return ["full_attention" if (i + 1) % PERIOD == 0 else "sliding_attention"
            for i in range(n_layers)]


def llama_cpp_query_scalar(tcfg: dict) -> float:
    """The query_pre_attn_scalar llama.cpp assumes (it never reads the config's)."""
    n_layers = int(tcfg["num_hidden_layers"])
    if n_layers == LLAMA_CPP_27B_LAYERS:
        return float(int(tcfg["hidden_size"]) // int(tcfg["num_attention_heads"]))
    return float(text.head_dim(tcfg))


def check(cfg: dict) -> None:
    """Refuse Gemma 3 checkpoints llama.cpp would run silently wrong."""
    tcfg = cfg["text_config"]
    n_layers = int(tcfg["num_hidden_layers"])
    pruned = bool(cfg.get("edgevlm_plan"))
    kept = list(tcfg.get("layer_types") or [])
    expected = llama_cpp_layer_types(n_layers)
    if kept and kept != expected:
        bad = [i for i, (a, b) in enumerate(zip(kept, expected, strict=False)) if a != b]
        raise UsageError(
            f"this {'pruned ' if pruned else ''}Gemma 3 has layer types that no longer follow "
            f"the local/global period of {PERIOD} (layer(s) {bad[:8]} would change type): "
            f"llama.cpp derives sliding vs global attention from the layer index (every "
            f"{PERIOD}th layer global), so those layers would run with the wrong attention "
            "and the GGUF would be silently wrong",
            f"prune so that the kept layers keep the pattern (e.g. drop {PERIOD} consecutive "
            "layers, or protect layers so types stay in place), or export to ONNX instead")
    scalar = tcfg.get("query_pre_attn_scalar")
    assumed = llama_cpp_query_scalar(tcfg)
    if scalar is not None and not math.isclose(float(scalar), assumed, rel_tol=1e-6):
        raise UsageError(
            f"this {'pruned ' if pruned else ''}Gemma 3 scales queries by "
            f"1/sqrt(query_pre_attn_scalar={scalar}), but llama.cpp ignores that setting and "
            f"picks 1/sqrt({assumed:g}) from the layer count ({n_layers}: it treats only a "
            f"{LLAMA_CPP_27B_LAYERS}-layer model as Gemma-3-27B), so every attention layer "
            "would be silently mis-scaled",
            f"keep {LLAMA_CPP_27B_LAYERS} layers for Gemma-3-27B GGUF exports (prune other "
            "sizes, not 27B), or export to ONNX instead")
    local = float(_rope(tcfg, "sliding_attention").get("rope_theta", LLAMA_CPP_SWA_ROPE_THETA))
    if local != LLAMA_CPP_SWA_ROPE_THETA:
        raise UnsupportedModelError(
            f"Gemma 3 local-layer rope_theta {local:g}: llama.cpp hard-codes "
            f"{LLAMA_CPP_SWA_ROPE_THETA:g} for sliding-window layers",
            "this checkpoint cannot be exported to GGUF")
    if _rope(tcfg, "sliding_attention").get("rope_type", "default") != "default":
        raise UnsupportedModelError("Gemma 3 with scaled rope on its local layers is not "
                                    "handled by llama.cpp", "export to ONNX instead")
    if _rope(tcfg, "full_attention").get("rope_type", "default") not in ("default", "linear"):
        raise UnsupportedModelError(
            f"Gemma 3 global rope_type '{_rope(tcfg, 'full_attention').get('rope_type')}' is not "
            "written by the GGUF writer", "only default or linear rope scaling is handled")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if tcfg.get(key):
            raise UnsupportedModelError(f"Gemma 3 with {key}={tcfg[key]}: llama.cpp's gemma3 "
                                        "graph does not apply it", "export to ONNX instead")
    if tcfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("Gemma 3 with bidirectional attention (an embedding "
                                    "model) is not a gemma3 decoder",
                                    "only causal Gemma 3 checkpoints can be exported")
    if not tcfg.get("sliding_window"):
        raise UnsupportedModelError("Gemma 3 without a sliding_window", "check the checkpoint's "
                                    "text_config; llama.cpp needs the window size")
    if tcfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedModelError(
            f"Gemma 3 activation '{tcfg.get('hidden_activation')}': llama.cpp uses tanh GELU",
            "this checkpoint cannot be exported to GGUF")
    _scale_factor(cfg)


def text_extra_metadata(writer, cfg: dict) -> None:
    from gguf import RopeScalingType

    tcfg = cfg["text_config"]
    full = _rope(tcfg, "full_attention")
    writer.add_rope_freq_base(float(full.get("rope_theta", 1e6)))
    writer.add_rope_freq_base_swa(float(_rope(tcfg, "sliding_attention").get(
        "rope_theta", LLAMA_CPP_SWA_ROPE_THETA)))
    writer.add_sliding_window(int(tcfg["sliding_window"]))
    # The same per-layer pattern llama.cpp derives (check() refused anything else); builds that
    # read {arch}.attention.sliding_window_pattern take it from here instead of the index.
    n_layers = int(tcfg["num_hidden_layers"])
    writer.add_sliding_window_pattern(
        [kind == "sliding_attention" for kind in llama_cpp_layer_types(n_layers)])
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))


def _scale_factor(cfg: dict) -> int:
    """Patches per side pooled into one soft token (llama.cpp assumes 4 unless told)."""
    vcfg = cfg["vision_config"]
    per_side = int(vcfg["image_size"]) // int(vcfg["patch_size"])
    tokens_side = math.isqrt(int(cfg.get("mm_tokens_per_image", 256)))
    if tokens_side * tokens_side != int(cfg.get("mm_tokens_per_image", 256)) or \
            per_side % tokens_side:
        raise UnsupportedModelError(
            f"Gemma 3 with {cfg.get('mm_tokens_per_image')} image tokens from {per_side}x"
            f"{per_side} patches: llama.cpp pools square blocks of whole patches",
            "this vision configuration cannot be exported to GGUF")
    return per_side // tokens_side


def mmproj(src, cfg: dict, proc: dict, folder, *, name: str, ftype: int):
    """(projector type, metadata writer, tensor jobs, io facts)."""
    vcfg = cfg["vision_config"]
    n_layers = int(vcfg["num_hidden_layers"])
    image = int(vcfg["image_size"])
    scale = _scale_factor(cfg)

    def metadata(writer):
        vision.vision_metadata(writer, projector=SPEC.gguf_projector, vcfg=vcfg,
                               text_hidden=cfg["text_config"]["hidden_size"], image_size=image,
                               patch_size=vcfg["patch_size"], n_layers=n_layers, proc=proc,
                               name=name, ftype=ftype)
        writer.add_vision_projector_scale_factor(scale)

    jobs = vision.mapped_jobs(
        src, n_layers,
        # Gemma RMSNorm (1 + w); llama.cpp multiplies by the stored weight.
        transforms={"mm.soft_emb_norm.weight": lambda w: w + 1.0},
        # clip.cpp transposes the projection in-graph, which quantized types cannot do.
        max_types={"mm.input_projection.weight": "F16"})
    return SPEC.gguf_projector, metadata, jobs, {"image_size": image, "image_tokens":
                                                 int(cfg.get("mm_tokens_per_image", 256)),
                                      "scale_factor": scale}
