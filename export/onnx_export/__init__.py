"""ONNX export of (pruned) VLMs in the transformers.js layout, verified against PyTorch.

Entry point: `export_onnx(model_dir, out_root, quant=..., vision_quant=...)` writes
`out_root/onnx/` and returns the ExportArtifact for manifest.json (the CLI stages `out_root`
in a temporary sibling and writes the manifest). The decoder comes from onnxruntime-genai's
model builder; the vision encoder (+ projector) and the token embeddings from torch.onnx.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from edgevlm import ui
from edgevlm.errors import UnsupportedModelError, UsageError
from edgevlm.runtimes import families
from edgevlm.types import ExportArtifact, ExportIO

ONNX_QUANTS = tuple(families.ONNX_SUFFIX)
VISION_QUANTS = ("none", "int8")
# Families whose export is implemented and verified (tests/test_onnx_export.py).
ONNX_FAMILIES = tuple(f.name for f in families.TABLE if "onnx" in f.targets)
# Families whose prefill attends bidirectionally among image tokens (Gemma 3), which the builder's causal
# GroupQueryAttention cannot express (its graph matches torch exactly on text, sliding window
# included, and is off by ~0.2 in logits with an image): these go through torch.onnx.
TORCH_DECODER_FAMILIES = tuple(f.name for f in families.TABLE if f.bidirectional_images)
DEFAULT_SAMPLES = 2


def check_onnx_quant(quant: str, vision_quant: str = "none") -> None:
    """Validate quantization names before any work (UsageError lists the valid ones)."""
    if quant not in ONNX_QUANTS:
        raise UsageError(f"unknown ONNX quantization '{quant}'", f"use one of: {', '.join(ONNX_QUANTS)}")
    if vision_quant not in VISION_QUANTS:
        raise UsageError(f"unknown ONNX vision quantization '{vision_quant}'",
                         f"use one of: {', '.join(VISION_QUANTS)}")


def check_onnx_family(family: str) -> None:
    """UnsupportedModelError (exit 2) for a family without an ONNX export."""
    if family not in ONNX_FAMILIES:
        raise UnsupportedModelError(
            f"ONNX export does not support the '{family}' family yet",
            f"supported: {', '.join(ONNX_FAMILIES)}; use --target gguf for {family}")


def check_onnx_target(quant: str, config=None, vision_quant: str = "none") -> None:
    """The CLI's pre-flight check: quantization names, and the family once a config is known."""
    check_onnx_quant(quant, vision_quant)
    if config is not None:
        from edgevlm.adapters import adapter_for_config

        check_onnx_family(adapter_for_config(config).family)


def export_onnx(model_dir: Path, out_root: Path, *, quant: str = "none", vision_quant: str = "none",
                verify: bool = True, samples=None, gen_tokens: int = 16,
                progress: bool = True) -> ExportArtifact:
    """Export the checkpoint folder `model_dir` (pruned or not) to `out_root/onnx/`.

    Writes config/tokenizer/processor files, `onnx/vision_encoder.onnx`,
    `onnx/embed_tokens.onnx`, `onnx/decoder_model_merged.onnx` (+ `_quantized`/`_q4` variants
    for `quant`/`vision_quant`) and `genai_config.json`; verifies them against PyTorch on
    `samples` (default: held-out builtin calibration samples) unless `verify` is False; raises
    VerificationError beyond tolerance. Scratch files live under `out_root` only while running.
    """
    from edgevlm.export.manifest import checkpoint_records, file_entry, tool_versions
    from edgevlm.export.onnx_export import layout, vision
    from edgevlm.export.onnx_export.quantize import quantize_int8_dynamic
    from edgevlm.export.onnx_export.textckpt import write_text_checkpoint
    from edgevlm.export.onnx_export.verify import verify_export
    from edgevlm.loader import load

    check_onnx_quant(quant, vision_quant)
    model_dir, out_root = Path(model_dir), Path(out_root)
    vlm = load(str(model_dir))
    family = vlm.adapter.family
    check_onnx_family(family)
    dest = out_root / "onnx"
    graphs = dest / "onnx"
    quants = ["none"] if quant == "none" else ["none", quant]
    from edgevlm.freeze import installed_layers

    frozen = installed_layers(vlm)  # ShortV: a separate prefill graph (freeze_prefill.py)
    steps = ["files", "vision", "embed", *[f"decoder {q}" for q in quants],
             *(["freeze prefill"] if frozen else []), "verify"]
    bar = ui.progress(desc="onnx export", total=len(steps), unit="step", enabled=progress)
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=out_root if out_root.exists() else None))
    files = []  # (path, role, dtype)
    try:
        for path in layout.copy_model_files(model_dir, dest, vlm):
            files.append((path, _config_role(path.name), ""))
        bar.update()
        bar.set_postfix_str("vision encoder")
        vision_io = vision.export_vision(vlm, scratch / "vision.onnx")
        for path in layout.place_graph(scratch / "vision.onnx", graphs / "vision_encoder.onnx"):
            files.append((path, _role("vision_encoder", path), "float32"))
        if vision_quant == "int8":
            quantize_int8_dynamic(graphs / "vision_encoder.onnx", scratch / "vision_int8.onnx")
            for path in layout.place_graph(scratch / "vision_int8.onnx",
                                           graphs / layout.graph_name("vision_encoder", "int8")):
                files.append((path, _role("vision_encoder_int8", path), "int8"))
        bar.update()
        embed_io = vision.export_embed_tokens(vlm, scratch / "embed.onnx")
        for path in layout.place_graph(scratch / "embed.onnx", graphs / "embed_tokens.onnx"):
            files.append((path, _role("embed_tokens", path), "float32"))
        bar.update()
        if family in TORCH_DECODER_FAMILIES:
            arch = ""
            _torch_decoders(vlm, scratch, graphs, quants, files, bar)
        else:
            arch = write_text_checkpoint(vlm, model_dir, scratch / "text")
            _builder_decoders(scratch, dest, graphs, quants, files, bar)
        freeze_io = None
        if frozen:
            from edgevlm.export.onnx_export import freeze_prefill

            bar.set_postfix_str("freeze prefill (torch.onnx)")
            freeze_io = freeze_prefill.export_all(vlm, scratch, graphs, quants, files, _role)
            bar.update()
        io = _export_io(vlm, out_root, files, graphs, vision_io, embed_io, arch, freeze_io)
        artifact = ExportArtifact(
            target="onnx",
            files=[file_entry(out_root, p, role, dtype) for p, role, dtype in files],
            base_model="", io=io,
            quantization={"decoder": quant, "vision_encoder": vision_quant,
                          "decoder_method": (BUILDER_METHOD if arch else TORCH_METHOD)[quant],
                          "vision_method": ("onnxruntime quantize_dynamic QInt8"
                                            if vision_quant == "int8" else "fp32"),
                          "suffixes": {k: v for k, v in families.ONNX_SUFFIX.items() if v}},
            versions={**tool_versions("onnx", "onnxruntime", "onnxruntime-genai", "onnxscript"),
                      "opset": vision.OPSET, "onnx_ir_version": _onnx_ir_version()})
        artifact.plan, artifact.recovery, artifact.base_model = checkpoint_records(model_dir)
        # Verification runs the export as a device does: OnnxVLM reads this manifest.
        artifact.save(out_root / "manifest.json")
        if verify:
            bar.set_postfix_str("verify")
            artifact.parity = verify_export(vlm, dest, samples or _default_samples(), quants,
                                            vision_quant, gen_tokens)
            if freeze_io:  # its checks join the report (export/parity.py's tolerances)
                from edgevlm.export.parity import ParityReport

                artifact.parity = freeze_prefill.verify_freeze_prefill(
                    vlm, dest, samples or _default_samples(),
                    ParityReport.from_dict(artifact.parity)).to_dict()
            artifact.save(out_root / "manifest.json")
        bar.update()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        bar.close()
    return artifact


def _onnx_ir_version() -> int:
    import onnx

    return onnx.IR_VERSION


DECODER_DTYPE = {"none": "float32", "int8": "int8", "q4": "int4"}
BUILDER_METHOD = {"none": "fp32", "int8": "onnxruntime-genai builder int8 (MatMulNBits 8-bit)",
                  "q4": "onnxruntime-genai builder int4 (MatMulNBits, block 32, accuracy level 4)"}
TORCH_METHOD = {"none": "fp32", "int8": "onnxruntime quantize_dynamic QInt8",
                "q4": "onnxruntime MatMulNBitsQuantizer 4-bit (block 32, accuracy level 4)"}


def _builder_decoders(scratch, dest, graphs, quants, files, bar) -> None:
    """One builder run per precision (it quantizes while building)."""
    from edgevlm.export.onnx_export import decoder, layout

    for q in quants:
        bar.set_postfix_str(f"decoder {q}")
        built = decoder.build_decoder(scratch / "text", scratch / f"decoder-{q}", scratch / "cache", q)
        name = layout.graph_name("decoder_model_merged", q)
        for path in layout.place_graph(built.model, graphs / name):
            files.append((path, _role("decoder" if q == "none" else f"decoder_{q}", path),
                          DECODER_DTYPE[q]))
        if q == "none":
            genai = layout.write_genai_config(built.folder / "genai_config.json",
                                              dest / "genai_config.json", name)
            files.append((genai, "genai_config", ""))
        bar.update()


def _torch_decoders(vlm, scratch, graphs, quants, files, bar) -> None:
    """torch.onnx fp32 decoder, quantized afterwards by onnxruntime's quantizers."""
    from edgevlm.export.onnx_export import layout
    from edgevlm.export.onnx_export.quantize import quantize_int8_dynamic, quantize_q4
    from edgevlm.export.onnx_export.torch_decoder import export_torch_decoder

    bar.set_postfix_str("decoder none (torch.onnx)")
    export_torch_decoder(vlm, scratch / "decoder.onnx")
    for q in quants:
        name = layout.graph_name("decoder_model_merged", q)
        src = scratch / "decoder.onnx"
        if q == "int8":
            src = quantize_int8_dynamic(src, scratch / "decoder-int8.onnx")
        elif q == "q4":
            src = quantize_q4(src, scratch / "decoder-q4.onnx")
        for path in layout.place_graph(src, graphs / name):
            files.append((path, _role("decoder" if q == "none" else f"decoder_{q}", path),
                          DECODER_DTYPE[q]))
        bar.update()


def _role(role: str, path: Path) -> str:
    return role + "_data" if path.name.endswith("_data") else role


def _config_role(name: str) -> str:
    if name.startswith("tokenizer") or name in ("vocab.json", "merges.txt", "special_tokens_map.json",
                                                "added_tokens.json"):
        return "tokenizer"
    if name.startswith("chat_template"):
        return "chat_template"
    return name.rsplit(".", 1)[0]


def _default_samples():
    from edgevlm.calib import load_calibration

    return load_calibration("builtin:8", seed=0).heldout[:DEFAULT_SAMPLES]


def _export_io(vlm, out_root: Path, files: list, graphs: Path, vision_io: dict, embed_io: dict,
               arch: str, freeze_io: dict | None) -> ExportIO:
    """manifest.io: the graphs by role and precision, and their I/O as a runner needs it
    (names, KV geometry, how positions are given)."""
    import onnx

    dec = onnx.load(str(graphs / "decoder_model_merged.onnx"), load_external_data=False)
    text = vlm.config.get_text_config()
    inputs = [i.name for i in dec.graph.input]
    heads = int(text.num_attention_heads)
    spec = families.family(vlm.adapter.family)
    by_role: dict[str, dict[str, str]] = {}
    for path, role, _dtype in files:
        if role.endswith("_data") or path.suffix != ".onnx":
            continue
        stem, _, precision = role.rpartition("_")
        if precision not in ONNX_QUANTS + VISION_QUANTS or not stem:
            stem, precision = role, "none"
        by_role.setdefault(stem, {})[precision] = path.relative_to(out_root).as_posix()
    decoder = {
        "inputs": inputs, "outputs": [o.name for o in dec.graph.output],
        "path": "genai-builder" if arch else "torch.onnx",
        "builder_architecture": arch or None,
        "kv_in_place": bool(arch),
        "opset": max((o.version for o in dec.opset_import if o.domain in ("", "ai.onnx")),
                     default=None),
        "logits": "last position only (prune_lm_head)",
        "num_kv_heads": int(text.num_key_value_heads or heads),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        "kv_layout": "(batch, kv_heads, seq, head_dim) fp32; past/present may share "
                     "one max-length buffer (GroupQueryAttention)",
        "position_ids": ("mrope-3d" if "position_ids" in inputs and spec.mrope
                         else "1d" if "position_ids" in inputs else "from attention_mask"),
        "attention": ("built in the graph: causal, bidirectional within each run of image "
                      "tokens (marked by the last inputs_embeds channel), sliding window"
                      if "attention_mask" not in inputs else "attention_mask (causal)")}
    io_graphs = {"vision_encoder": vision_io, "embed_tokens": embed_io, "decoder": decoder}
    if freeze_io:
        io_graphs["decoder_prefill_freeze"] = freeze_io
    return ExportIO(family=spec.name,
                    image_token_id=(vlm.adapter.image_token_ids(vlm.config) or [None])[0],
                    image_token=spec.image_token, num_layers=int(text.num_hidden_layers),
                    hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size),
                    files=by_role, graphs=io_graphs)
