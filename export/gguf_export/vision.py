"""The mmproj half shared by the families: clip.* metadata and vision tensor jobs."""

from __future__ import annotations

from edgevlm.errors import UsageError
from edgevlm.export.gguf_export.writer import TensorJob

# llama.cpp reads these as F32/F16 only (convolutions, learned embeddings added to activations).
KEEP_F32 = ("v.patch_embd", "v.position_embd", "v.class_embd")


def vision_metadata(writer, *, projector: str, vcfg: dict, text_hidden: int, image_size: int,
                    patch_size: int, n_layers: int, proc: dict, name: str, ftype: int,
                    n_embd: int | None = None, n_head: int | None = None,
                    n_ff: int | None = None, eps: float = 1e-6) -> None:
    """The clip.* keys every projector needs."""
    writer.add_name(f"mmproj-{name}")
    writer.add_type("mmproj")
    writer.add_file_type(ftype)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(projector)
    writer.add_vision_projection_dim(int(text_hidden))
    writer.add_vision_image_size(int(image_size))
    writer.add_vision_patch_size(int(patch_size))
    writer.add_vision_embedding_length(int(n_embd or vcfg["hidden_size"]))
    writer.add_vision_feed_forward_length(int(n_ff or vcfg["intermediate_size"]))
    writer.add_vision_block_count(int(n_layers))
    writer.add_vision_head_count(int(n_head or vcfg["num_attention_heads"]))
    writer.add_vision_attention_layernorm_eps(float(vcfg.get("layer_norm_eps", eps)))
    writer.add_vision_image_mean([float(x) for x in proc.get("image_mean", [0.5] * 3)])
    writer.add_vision_image_std([float(x) for x in proc.get("image_std", [0.5] * 3)])
    act = vcfg.get("hidden_act", "quick_gelu")
    if act in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        writer.add_vision_use_gelu(True)
    elif act == "silu":
        writer.add_vision_use_silu(True)
    elif act != "quick_gelu":
        raise UsageError(f"vision activation '{act}' has no llama.cpp equivalent",
                         "this vision tower cannot be exported to GGUF")


def mapped_jobs(src, n_blocks: int, overrides: dict | None = None, skip=(), *,
                transforms: dict | None = None, max_types: dict | None = None) -> list[TensorJob]:
    """Jobs for every source tensor, named by gguf's TensorNameMap (MMPROJ) unless
    `overrides` maps the source base name to a GGUF base name. `transforms` (GGUF full name
    -> fn on the float32 array) and `max_types` (GGUF full name -> "F16") adjust single tensors."""
    from gguf import MODEL_ARCH, TensorNameMap

    # gguf numbers projector layers like blocks (visual.merger.mlp.{bid} -> mm.{bid}): a
    # tower with fewer than 3 blocks (vision-pruned, depth-reduced) must still name mlp.2.
    names = TensorNameMap(MODEL_ARCH.MMPROJ, max(n_blocks, 4))
    overrides, transforms, max_types = overrides or {}, transforms or {}, max_types or {}
    jobs = []
    for name in src.names():
        base, _, suffix = name.rpartition(".")
        if base in skip or name in skip:
            continue
        gguf_base = overrides.get(base) or names.get_name(base)
        if gguf_base is None and suffix not in ("weight", "bias"):
            # bare parameters (class_embedding) are mapped by their full name
            gguf_base, suffix = names.get_name(name), ""
        if gguf_base is None:
            raise UsageError(f"no GGUF name for vision tensor '{name}'",
                             "this checkpoint has vision weights the writer does not know")
        shape = src.shape(name)
        full = f"{gguf_base}.{suffix}" if suffix else gguf_base
        jobs.append(TensorJob(full, shape, _loader(src, name, transforms.get(full)),
                              keep_f32=len(shape) == 1 or gguf_base.startswith(KEEP_F32),
                              max_type=max_types.get(full)))
    return jobs


def _loader(src, name, transform=None):
    def load():
        data = src.get(name)
        return transform(data) if transform else data
    return load
