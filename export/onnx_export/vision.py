"""Vision encoder (+ projector) and token-embedding graphs through torch.onnx (dynamo).

Each family gets a small wrapper module with plain tensor inputs. Anything data-dependent
(dropping padding tiles, Qwen's per-image position ids / cu_seqlens / window index) is done on
the host by `edgevlm.runtimes.ort_generate.vision_inputs`, so one graph serves any image size
and several images. Output: `image_features` (num_image_tokens, hidden), in the order the
image tokens appear in `input_ids`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from edgevlm.errors import EdgeVLMError, require

OPSET = 18


def _torch():
    import torch

    return torch


class EmbedTokens(_torch().nn.Module):
    """input_ids (B, S) -> inputs_embeds (B, S, H); Gemma3's sqrt(H) scaling is in the module."""

    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class SmolVLMVision(_torch().nn.Module):
    """Tiles (N, 3, H, W) + pixel_attention_mask (N, H, W) -> (N * tokens_per_tile, hidden)."""

    def __init__(self, model):
        super().__init__()
        inner = model.model
        self.vision = inner.vision_model
        self.connector = inner.connector
        self.patch = int(model.config.vision_config.patch_size)

    def forward(self, pixel_values, pixel_attention_mask):
        n, _, h, w = pixel_values.shape
        p = self.patch
        mask = pixel_attention_mask.to(pixel_values.dtype).reshape(n, h // p, p, w // p, p)
        patch_mask = mask.sum(dim=(2, 4)) > 0
        hidden = self.vision(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
        feats = self.connector(hidden)
        return feats.reshape(-1, feats.shape[-1])


class LlavaVision(_torch().nn.Module):
    """Images (N, 3, H, W) -> (N * tokens, hidden), using the config's feature layer/strategy.

    Calls the tower and projector directly: `get_image_features` returns a Python list, which
    would pin the image count in the exported graph."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        cfg = model.config
        self.layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) \
            else [cfg.vision_feature_layer]
        self.drop_cls = cfg.vision_feature_select_strategy == "default"

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        picked = [hidden[i][:, 1:] if self.drop_cls else hidden[i] for i in self.layers]
        feats = self.projector(_torch().cat(picked, dim=-1))
        return feats.reshape(-1, feats.shape[-1])


class Gemma3Vision(_torch().nn.Module):
    """Images (N, 3, H, W) -> (N * mm_tokens_per_image, hidden)."""

    def __init__(self, model):
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values):
        feats = self.model.get_image_features(pixel_values).pooler_output
        return feats.reshape(-1, feats.shape[-1])


def vision_wrapper(vlm):
    """(wrapper module, input names, example inputs, dynamic shapes) for a family's encoder."""
    torch = _torch()
    family = vlm.adapter.family
    vcfg = vlm.config.vision_config
    model = vlm.model
    batch = torch.export.Dim("num_images", min=1, max=256)
    if family == "smolvlm":
        size = int(vcfg.image_size)
        pv = torch.randn(2, 3, size, size)
        mask = torch.ones(2, size, size, dtype=torch.int64)
        return (SmolVLMVision(model), ["pixel_values", "pixel_attention_mask"], (pv, mask),
                ({0: batch}, {0: batch}))
    if family in ("llava", "gemma3"):
        size = int(vcfg.image_size)
        wrapper = LlavaVision(model) if family == "llava" else Gemma3Vision(model)
        return wrapper, ["pixel_values"], (torch.randn(2, 3, size, size),), ({0: batch},)
    if family in ("qwen2-vl", "qwen2.5-vl"):
        from edgevlm.export.onnx_export.qwen_vision import qwen_vision_wrapper

        return qwen_vision_wrapper(vlm)
    raise EdgeVLMError(f"no ONNX vision encoder for family '{family}'")


def export_vision(vlm, path: Path) -> dict:
    """Export the vision encoder + projector; returns its I/O description."""
    wrapper, names, example, dynamic = vision_wrapper(vlm)
    _export(wrapper.eval(), example, path, names, ["image_features"], dynamic)
    return {"inputs": names, "outputs": ["image_features"]}


def export_embed_tokens(vlm, path: Path) -> dict:
    """Export the token embedding table as input_ids -> inputs_embeds."""
    torch = _torch()
    wrapper = EmbedTokens(vlm.adapter.embed_tokens(vlm.model)).eval()
    b, s = torch.export.Dim("batch_size", min=1, max=64), torch.export.Dim("sequence_length", min=1, max=1 << 20)
    _export(wrapper, (torch.ones(1, 4, dtype=torch.int64),), path, ["input_ids"], ["inputs_embeds"],
            ({0: b, 1: s},))
    return {"inputs": ["input_ids"], "outputs": ["inputs_embeds"]}


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    """torch.onnx.export (dynamo) into one self-contained file (external data over 2 GB)."""
    torch = _torch()
    require("onnxscript", "onnx", "exporting ONNX graphs with torch.onnx")
    log = io.StringIO()
    # The exporter logs a warning per torchvision op it cannot register; torchvision is
    # deliberately absent.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes,
                                        opset_version=OPSET, optimize=True, verbose=False)
    except Exception as exc:
        raise EdgeVLMError(f"torch.onnx could not export {Path(path).name}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}",
                           "report it with the model's config.json") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=_too_big(program))


def _too_big(program) -> bool:
    """External data only for graphs over the 2 GB protobuf limit."""
    total = 0
    for value in program.model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total > (2 << 30) - (64 << 20)
