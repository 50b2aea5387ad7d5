"""The ShortV freeze prefill graph (docs/methods.md section 4), through torch.onnx.

`onnx/decoder_model_merged_prefill_freeze.onnx` runs a whole prompt from an empty KV cache:
inputs `inputs_embeds` (as the decode graph takes them: Gemma 3 with its image-flag channel),
`position_ids` ((1, S); Qwen: M-RoPE (3, 1, S)) and `text_positions` (R,) int64, the sorted
indices of the prompt's non-image rows; outputs `logits` (1, 1, vocab) at the last position
and `present.{i}.key/value` (1, kv_heads, S, head_dim) fp32, the decode graph's KV names,
shapes and dtypes, so a runner prefills with this graph and decodes with the normal one
(`decoder_model_merged*.onnx`, unchanged, with its fast attention).

It traces edgevlm's PyTorch freeze forward (`edgevlm.freeze.freeze_layer`): in a frozen
layer the normed hidden states of the text rows are gathered before the query projection,
the attention output and the MLP run on those rows only, and the result is scattered back
into the unchanged hidden states; keys and values come from every row. Layers that are not
frozen run the model's own layer code with an explicit causal bias (Gemma 3: the bias of
`torch_decoder.BiasDecoder`, image runs both ways and sliding windows).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgevlm.errors import EdgeVLMError, VerificationError
from edgevlm.export.onnx_export.torch_decoder import image_flag, logits_and_present
from edgevlm.export.parity import KV_TOLERANCES, TOLERANCES, ParityReport, scaled_error
from edgevlm.runtimes import families

GRAPH_STEM = "decoder_model_merged_prefill_freeze"
INPUTS = ("inputs_embeds", "position_ids", "text_positions")


class FreezePrefill(nn.Module):
    """inputs_embeds, position_ids, text_positions -> last logits, *present."""

    def __init__(self, vlm):
        super().__init__()
        from edgevlm.freeze import installed_layers

        if not installed_layers(vlm):
            raise EdgeVLMError("the model has no frozen layers to export a freeze prefill for",
                               "load a checkpoint made with --mode freeze")
        self.text = vlm.adapter.text_stack(vlm.model)
        self.lm_head = vlm.adapter.lm_head_module(vlm.model)
        self.state = vlm.model._edgevlm_freeze_state
        text = vlm.config.get_text_config()
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.window = getattr(text, "sliding_window", None)
        self.flag = image_flag(vlm.adapter.family)
        self.n_layers = len(self.text.layers)

    def forward(self, inputs_embeds, position_ids, text_positions):
        from transformers import DynamicCache

        from edgevlm.export.onnx_export.torch_decoder import BiasDecoder

        if self.flag:
            embeds, flag = inputs_embeds[..., :-1], inputs_embeds[..., -1]
            masks = BiasDecoder.biases(self, flag, 0, embeds.dtype)
        else:
            embeds = inputs_embeds
            seq = torch.arange(embeds.shape[1], device=embeds.device)
            causal = seq[None, :] <= seq[:, None]
            masks = torch.where(causal, torch.zeros((), dtype=embeds.dtype),
                                torch.full((), torch.finfo(embeds.dtype).min,
                                           dtype=embeds.dtype))[None, None]
        cache = DynamicCache()
        self.state.set(text_positions, None)
        try:
            out = self.text(inputs_embeds=embeds, attention_mask=masks, position_ids=position_ids,
                            past_key_values=cache, use_cache=True)
        finally:
            self.state.clear()
        return logits_and_present(self.lm_head, self.softcap, out.last_hidden_state, cache)


def _example(vlm):
    text = vlm.config.get_text_config()
    hidden = int(text.hidden_size)
    s = 7
    visual = torch.tensor([0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    embeds = torch.randn(1, s, hidden)
    if image_flag(vlm.adapter.family):
        embeds = torch.cat([embeds, visual.float()[None, :, None]], dim=-1)
    if families.family(vlm.adapter.family).mrope:
        positions = torch.arange(s)[None, None].expand(3, 1, s).contiguous()
    else:
        positions = torch.arange(s)[None]
    return embeds, positions, torch.nonzero(~visual).squeeze(1)


def export_freeze_prefill(vlm, path: Path) -> dict:
    """Export FreezePrefill with a dynamic sequence length and text-row count."""
    import onnx

    from edgevlm.export.onnx_export.vision import _export

    n = len(vlm.adapter.layers(vlm.model))
    seq = torch.export.Dim("sequence_length", min=2, max=1 << 17)
    rows = torch.export.Dim("text_length", min=1, max=1 << 17)
    example = _example(vlm)
    pos_dynamic = {2: seq} if example[1].dim() == 3 else {1: seq}
    out_names = ["logits"] + [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
    _export(FreezePrefill(vlm).eval(), example, path, list(INPUTS), out_names,
            ({1: seq}, pos_dynamic, {0: rows}))
    model = onnx.load(str(path), load_external_data=False)
    from edgevlm.freeze import installed_layers

    onnx.helper.set_model_props(model, {"edgevlm.kv_in_place": "0",
                                        "edgevlm.frozen_layers": ",".join(
                                            str(i) for i in installed_layers(vlm))})
    onnx.save(model, str(path))
    return {"path": f"onnx/{GRAPH_STEM}.onnx", "inputs": list(INPUTS), "outputs": out_names,
            "frozen_layers": installed_layers(vlm),
            "use": "prefill of a prompt with image tokens (from an empty KV cache); decode "
                   "steps run decoder_model_merged, whose KV cache layout it shares",
            "text_positions": "sorted indices of the prompt rows that are not image tokens"}


def export_all(vlm, scratch: Path, graphs: Path, quants, files: list, role) -> dict:
    """The fp32 freeze prefill and its quantized variants (onnxruntime's quantizers, as for
    the torch.onnx decoders), placed next to the decode graphs; appends to `files`."""
    from edgevlm.export.onnx_export import layout
    from edgevlm.export.onnx_export.quantize import quantize_int8_dynamic, quantize_q4

    dtypes = {"none": "float32", "int8": "int8", "q4": "int4"}
    io = export_freeze_prefill(vlm, scratch / "freeze.onnx")
    for q in quants:
        src = scratch / "freeze.onnx"
        if q == "int8":
            src = quantize_int8_dynamic(src, scratch / "freeze-int8.onnx")
        elif q == "q4":
            src = quantize_q4(src, scratch / "freeze-q4.onnx")
        for path in layout.place_graph(src, graphs / layout.graph_name(GRAPH_STEM, q)):
            files.append((path, role("decoder_prefill_freeze" if q == "none"
                                     else f"decoder_prefill_freeze_{q}", path), dtypes[q]))
    return io


def torch_prefill(vlm, sample) -> dict:
    """The PyTorch freeze forward on one sample: inputs (numpy), last logits, KV cache."""
    from edgevlm.prompting import encode, model_inputs
    from edgevlm.runtimes.ort_generate import POSITION_START

    batch = model_inputs(encode(vlm, [sample]))
    start = POSITION_START.get(vlm.adapter.family)
    kwargs = {}
    if start:  # the export's positions start there (rotary: logits equal, cached keys not)
        kwargs["position_ids"] = torch.arange(start, start + batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        out = vlm.model(**batch, use_cache=True, **kwargs)
    kv = {}
    for i, layer in enumerate(out.past_key_values.layers):
        kv[f"past_key_values.{i}.key"] = layer.keys[0].float().numpy()
        kv[f"past_key_values.{i}.value"] = layer.values[0].float().numpy()
    inputs = {k: v.numpy() for k, v in batch.items() if hasattr(v, "numpy")}
    return {"inputs": inputs, "logits": out.logits[0, -1].float().numpy(), "kv": kv}


def verify_freeze_prefill(vlm, folder: Path, samples,
                          report: ParityReport | None = None) -> ParityReport:
    """The ONNX freeze prefill against the PyTorch freeze forward (`torch_prefill`): last-
    position logits and every layer's KV cache (Gemma 3's sliding layers: the positions
    PyTorch's windowed cache keeps), as checks of `report` (a new ONNX one if None) with
    export/parity.py's f32 tolerances; the measured figures go into
    report.measured["freeze_prefill"]. Raises VerificationError when a check fails."""
    from edgevlm.runtimes.ort_generate import OnnxVLM

    runner = OnnxVLM(folder)
    if runner.freeze_prefill is None:
        raise VerificationError("the export has no freeze prefill graph", "report it")
    report = report or ParityReport(target="onnx", samples=len(samples))
    logit = kv_err = logit_abs = kv_abs = 0.0
    names_equal = True
    for sample in samples:
        ref = torch_prefill(vlm, sample)
        logits, kv = runner.freeze_prefill_outputs(ref["inputs"])
        err, diff = scaled_error(logits, ref["logits"])
        logit, logit_abs = max(logit, err), max(logit_abs, diff)
        if set(kv) != set(ref["kv"]):
            names_equal = False
            continue
        for name, want in ref["kv"].items():
            got = kv[name][0][:, -want.shape[1]:]  # a windowed PyTorch layer keeps the last ones
            err, diff = scaled_error(got, want)
            kv_err, kv_abs = max(kv_err, err), max(kv_abs, diff)
    report.add("fp32 freeze prefill logits error (PyTorch freeze forward)", logit, "<=",
               TOLERANCES["f32"].logits)
    report.add("fp32 freeze prefill KV cache names equal PyTorch's", float(names_equal), ">=",
               1.0)
    report.add("fp32 freeze prefill KV cache error", kv_err, "<=", KV_TOLERANCES["f32"])
    report.measured["freeze_prefill"] = {"samples": len(samples),
                                         "logits_max_abs_diff": logit_abs,
                                         "kv_max_abs_diff": kv_abs}
    report.raise_if_failed("ONNX freeze prefill disagrees with the PyTorch freeze forward",
                           "report it with the model's config.json; the export was not written")
    return report
