"""Vision encoder (+ projector) and token-embedding graphs through torch.onnx (dynamo).

Each family's graph takes the inputs transformers.js 4 feeds its vision encoder, straight
from the processor (edgevlm's runner feeds the same): SmolVLM the rank-5 tiles and a bool
`pixel_attention_mask` (padding tiles dropped in the graph), Qwen the patches and the grid
(positions, attention blocks and windows computed in the graph, `qwen_vision`), LLaVA and
Gemma 3 `pixel_values`. Output: `image_features` (num_image_tokens, hidden), in the order the
image tokens appear in `input_ids`; Gemma 3 adds the image-flag channel (`torch_decoder`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from edgevlm import ui
from edgevlm.errors import EdgeVLMError, require
from edgevlm.export.onnx_export.vision_attention import fused_vision_attention
from edgevlm.runtimes import families

OPSET = 18


def _torch():
    import torch

    return torch


class EmbedTokens(_torch().nn.Module):
    """input_ids (B, S) -> inputs_embeds (B, S, H); Gemma3's sqrt(H) scaling is in the module.
    `flag`: a last channel of zeros (text) for the decoder's image-flag contract."""

    def __init__(self, embed, flag: bool = False):
        super().__init__()
        self.embed = embed
        self.flag = flag

    def forward(self, input_ids):
        embeds = self.embed(input_ids)
        return _with_flag(embeds, 0.0) if self.flag else embeds


class Flagged(_torch().nn.Module):
    """A vision encoder whose features get a last channel of ones (image rows)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        return _with_flag(self.encoder(pixel_values), 1.0)


def _with_flag(x, value: float):
    return _torch().nn.functional.pad(x, (0, 1), value=value)


class SmolVLMVision(_torch().nn.Module):
    """Tiles (B, N, 3, H, W) + bool pixel_attention_mask (B, N, H, W) -> (tiles * tokens_per_tile,
    hidden). All-zero tiles (padding to the batch's largest image) are dropped, as the model
    does (all of them zero: the first is kept)."""

    def __init__(self, model):
        super().__init__()
        inner = model.model
        self.vision = inner.vision_model
        self.connector = inner.connector
        self.patch = int(model.config.vision_config.patch_size)

    def forward(self, pixel_values, pixel_attention_mask):
        torch = _torch()
        c, h, w = pixel_values.shape[-3:]
        pixel_values = pixel_values.reshape(-1, c, h, w)
        real = (pixel_values != 0).flatten(1).any(1)
        first = torch.arange(real.shape[0], device=real.device) == 0
        keep = torch.nonzero(real | (first & ~real.any())).squeeze(1)
        pixel_values = pixel_values[keep]
        pixel_attention_mask = pixel_attention_mask.reshape(-1, h, w)[keep]
        n, p = pixel_values.shape[0], self.patch
        mask = pixel_attention_mask.to(pixel_values.dtype).reshape(n, h // p, p, w // p, p)
        patch_mask = mask.sum(dim=(2, 4)) > 0
        with _bucketize_as_comparisons():
            hidden = self.vision(pixel_values=pixel_values,
                                 patch_attention_mask=patch_mask).last_hidden_state
        feats = self.connector(hidden)
        return feats.reshape(-1, feats.shape[-1])


@contextlib.contextmanager
def _bucketize_as_comparisons():
    """Idefics3's patch positions use torch.bucketize, which exports to a GatherND that reads
    past the boundaries when an image covers a fraction of a patch row (onnxruntime: 'invalid
    index found'). Counting the boundaries below x is the same bucket and exports as a
    comparison and a sum."""
    torch = _torch()
    original = torch.bucketize

    def counted(x, boundaries, *, right=False, **_):
        below = boundaries <= x[..., None] if right else boundaries < x[..., None]
        return below.sum(-1)

    torch.bucketize = counted
    try:
        yield
    finally:
        torch.bucketize = original


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
        pv = torch.randn(2, 2, 3, size, size)
        pv[1, 1] = 0  # a padding tile
        mask = torch.ones(2, 2, size, size, dtype=torch.bool)
        tiles = torch.export.Dim("num_tiles", min=1, max=256)
        return (SmolVLMVision(model), list(vlm.adapter.onnx_vision_inputs), (pv, mask),
                ({0: batch, 1: tiles}, {0: batch, 1: tiles}))
    if family in ("llava", "gemma3"):
        size = int(vcfg.image_size)
        wrapper = LlavaVision(model) if family == "llava" else Gemma3Vision(model)
        return wrapper, list(vlm.adapter.onnx_vision_inputs), (torch.randn(2, 3, size, size),), ({0: batch},)
    if family in ("qwen2-vl", "qwen2.5-vl"):
        from edgevlm.export.onnx_export.qwen_vision import qwen_vision_wrapper

        return qwen_vision_wrapper(vlm)
    raise EdgeVLMError(f"no ONNX vision encoder for family '{family}'")


def export_vision(vlm, path: Path) -> dict:
    """Export the vision encoder + projector; returns its I/O description."""
    from edgevlm.export.onnx_export.torch_decoder import image_flag

    wrapper, names, example, dynamic = vision_wrapper(vlm)
    if image_flag(vlm.adapter.family):
        wrapper = Flagged(wrapper)
    if families.family(vlm.adapter.family).onnx_fused_vision_attention:
        with fused_vision_attention(vlm.config.vision_config):
            _export(wrapper.eval(), example, path, names, ["image_features"], dynamic)
    else:
        _export(wrapper.eval(), example, path, names, ["image_features"], dynamic)
    return {"inputs": names, "outputs": ["image_features"]}


def export_embed_tokens(vlm, path: Path) -> dict:
    """Export the token embedding table as input_ids -> inputs_embeds."""
    torch = _torch()
    from edgevlm.export.onnx_export.torch_decoder import image_flag

    wrapper = EmbedTokens(vlm.adapter.embed_tokens(vlm.model),
                          flag=image_flag(vlm.adapter.family)).eval()
    b, s = torch.export.Dim("batch_size", min=1, max=64), torch.export.Dim("sequence_length", min=1, max=1 << 20)
    _export(wrapper, (torch.ones(1, 4, dtype=torch.int64),), path, ["input_ids"], ["inputs_embeds"],
            ({0: b, 1: s},))
    return {"inputs": ["input_ids"], "outputs": ["inputs_embeds"]}


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    """torch.onnx.export (dynamo) into one self-contained file (external data over 2 GB)."""
    torch = _torch()
    require("onnxscript", "onnx", "exporting ONNX graphs with torch.onnx")
    # The exporter logs a warning per torchvision op it cannot register (torchvision is
    # deliberately absent) and prints its progress: silenced for this call only.
    try:
        with torch.no_grad(), warnings.catch_warnings(), ui.quieted(logs=logging.WARNING,
                                                                    stdout=True):
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
