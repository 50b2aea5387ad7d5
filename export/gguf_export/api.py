"""export_gguf(): checkpoint folder -> <name>-<quant>.gguf + mmproj-<name>-<type>.gguf, verified."""

from __future__ import annotations

import ctypes
from pathlib import Path

from edgevlm.errors import UsageError, require
from edgevlm.export.gguf_export import quantize as q
from edgevlm.export.gguf_export import text
from edgevlm.export.gguf_export.families import family_module
from edgevlm.export.gguf_export.source import CheckpointSource, read_config
from edgevlm.export.gguf_export.tokenizer import tokenizer_plan
from edgevlm.export.gguf_export.writer import write_gguf
from edgevlm.runtimes import families
from edgevlm.runtimes.preprocess.common import CheckpointFiles
from edgevlm.types import ExportArtifact, ExportIO


def _config_dict(model_config) -> dict:
    if isinstance(model_config, dict):
        return model_config
    if hasattr(model_config, "to_dict"):
        return model_config.to_dict()
    return read_config(Path(model_config))


def _checkpoint_folder(model_config) -> Path | None:
    """The local folder behind `model_config` (a folder, or a transformers config loaded
    from one), where tokenizer.json lives; None for a bare config dict."""
    if isinstance(model_config, (str, Path)):
        return Path(model_config)
    where = getattr(model_config, "_name_or_path", None) or getattr(model_config, "name_or_path",
                                                                    None)
    if where and Path(where).is_dir() and (Path(where) / "config.json").exists():
        return Path(where)
    return None


def check_gguf_quant(quant: str, model_config=None, mmproj_type: str = "f16") -> None:
    """Raise UsageError before any work if `quant` or `mmproj_type` is unknown or this model
    cannot take it (UnsupportedModelError when the family or its tokenizer cannot be written).

    `model_config` is a transformers config, a config.json dict or a checkpoint folder; with
    None only the quant and mmproj names are checked (before a model is loaded or pruned).
    The tokenizer is checked when the checkpoint folder is known (a folder, or a config
    loaded from one).
    """
    spec = q.resolve_quant(quant)
    q.resolve_mmproj_type(mmproj_type)
    if model_config is None:
        return
    cfg = _config_dict(model_config)
    _family, module = family_module(cfg)
    module.check(cfg)
    folder = _checkpoint_folder(model_config)
    if folder is not None:
        tokenizer_plan(folder)  # refuses SentencePiece / unknown pre-tokenizers now, not late
    tcfg = cfg.get("text_config", cfg)
    hidden = int(tcfg["hidden_size"])
    # llama.cpp's quantizer stores tensors whose rows do not fit a K-quant's 256-blocks in a
    # fallback type (reported in the manifest); our numpy quantizers have no fallback.
    if spec.block > 1 and hidden % spec.block and spec.method != "llama.cpp":
        raise UsageError(
            f"quant '{spec.name}' needs rows that are multiples of {spec.block}, but this model's "
            f"hidden size is {hidden}: every weight matrix would fall back to another type",
            "use " + ("q8_0 or q4_0 (blocks of 32)" if spec.block == 256 and hidden % 32 == 0
                      else "f16 or f32"))


def _names(model_dir: Path, name: str | None, quant: str, mmproj_type: str) -> tuple[str, Path, Path]:
    name = name or model_dir.resolve().name
    if not name.strip() or "/" in name or "\\" in name or name.startswith("."):
        raise UsageError(f"GGUF file base name '{name}' is not a plain file name",
                         "pass a name without path separators or a leading dot")
    return name, Path(f"gguf/{name}-{quant}.gguf"), Path(f"gguf/mmproj-{name}-{mmproj_type}.gguf")


def write_text(model_dir: Path, out: Path, cfg: dict, module, spec: q.GGUFQuant, *, name: str,
               progress: bool, keep_intermediate: bool = False) -> dict:
    """Write the text GGUF at `spec` (directly, or via llama_model_quantize); returns facts.
    With `keep_intermediate` the f32 file a K-quant is made from stays (facts["intermediate"],
    a hidden name next to `out`) for verification; the caller deletes it."""
    import llama_cpp

    tcfg = cfg["text_config"]
    opts = module.text_options(cfg)
    direct = spec if spec.method == "numpy" else q.GGUF_QUANTS["f32"]
    ftype = getattr(llama_cpp, direct.ftype)
    with CheckpointSource(model_dir, module.TEXT_RENAME) as src:
        jobs = text.text_jobs(src, tcfg, opts)
        tok = {}

        def metadata(writer):
            tok.update(text.text_metadata(writer, model_dir, tcfg, name=name, ftype=ftype))
            module.text_extra_metadata(writer, cfg)

        target = out if spec.method == "numpy" else out.with_name(f".{out.stem}-f32-intermediate.gguf")
        try:
            result = write_gguf(target, opts.arch, metadata, jobs, direct.ggml_type, direct.block,
                                progress=progress, desc=f"text {spec.name}")
            if spec.method == "llama.cpp":
                _llama_quantize(target, out, getattr(llama_cpp, spec.ftype))
        except BaseException:
            if target != out:
                target.unlink(missing_ok=True)
            raise
    if target != out and not keep_intermediate:
        target.unlink(missing_ok=True)
    types = result.types if spec.method == "numpy" else _file_types(out)
    fallback = _fallbacks(types, jobs, spec)
    return {"arch": opts.arch, "types": types, "fallback": fallback, "tokenizer": tok,
            "n_layers": int(tcfg["num_hidden_layers"]),
            "intermediate": target if target != out and keep_intermediate else None}


def _llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    from edgevlm.runtimes.llamacpp_runner import native_error, silence_native_logs

    silence_native_logs()  # captured: its tail goes into the error below
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise native_error(f"llama_model_quantize failed (return code {rc}) for {dst.name}",
                               "try a numpy quant (q8_0, q4_0)")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def _file_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def _fallbacks(types: dict[str, str], jobs, spec: q.GGUFQuant) -> list[dict]:
    """2-D weights whose rows are not a multiple of the quant's block: llama.cpp or our writer
    stored them in another type. Reported with the type they got."""
    if spec.block <= 1:
        return []
    return [{"tensor": j.name, "row": j.shape[-1], "type": types.get(j.name)}
            for j in jobs if len(j.shape) >= 2 and j.shape[-1] % spec.block]


def write_mmproj(model_dir: Path, out: Path, cfg: dict, module, mmproj_type: str, *, name: str,
                 progress: bool) -> dict:
    import llama_cpp

    main = q.MMPROJ_TYPES[mmproj_type]
    ftype = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
             "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[main]
    # The image processor's settings where the runners read them: transformers 5 nests them in
    # processor_config.json, hub checkpoints keep them in preprocessor_config.json.
    proc = CheckpointFiles.read(model_dir).image
    with CheckpointSource(model_dir, module.VISION_RENAME) as src:
        projector, metadata, jobs, io = module.mmproj(src, cfg, proc, model_dir, name=name, ftype=ftype)
        result = write_gguf(out, "clip", metadata, jobs, main, 32 if main == "Q8_0" else 1,
                            progress=progress, desc=f"mmproj {mmproj_type}")
    return {"projector": projector, "types": result.types, "fallback": result.fallback, "io": io}


def export_gguf(model_dir: Path, out_root: Path, *, quant: str = "f16", mmproj_type: str = "f16",
                verify: bool = True, samples=None, gen_tokens: int = 16,
                progress: bool = True, name: str | None = None) -> ExportArtifact:
    """Write out_root/gguf/<name>-<quant>.gguf and out_root/gguf/mmproj-<name>-<type>.gguf from
    the checkpoint folder `model_dir` (pruned or not), verify them in llama.cpp against the
    PyTorch model, and return the manifest (paths relative to out_root).

    `name` is the file base name (default: the checkpoint folder's name), e.g.
    "SmolVLM-256M-Instruct-bi30".

    Raises UsageError for bad arguments, VerificationError when llama.cpp disagrees with
    PyTorch beyond tolerance. The caller owns out_root's temp-dir + rename.
    """
    require("gguf", "gguf", "GGUF export")
    llama_cpp = require("llama_cpp", "gguf", "GGUF export", package="llama-cpp-python")
    model_dir, out_root = Path(model_dir), Path(out_root)
    cfg = read_config(model_dir)
    check_gguf_quant(quant, model_dir, mmproj_type)
    spec = q.resolve_quant(quant)
    mmproj_type = q.resolve_mmproj_type(mmproj_type)
    family, module = family_module(cfg)
    name, text_rel, mm_rel = _names(model_dir, name, spec.name, mmproj_type)
    (out_root / "gguf").mkdir(parents=True, exist_ok=True)
    text_path, mm_path = out_root / text_rel, out_root / mm_rel
    text_facts = {}
    manifest = out_root / "manifest.json"
    try:
        text_facts = write_text(model_dir, text_path, cfg, module, spec, name=name,
                                progress=progress, keep_intermediate=verify)
        mm_facts = write_mmproj(model_dir, mm_path, cfg, module, mmproj_type, name=name,
                                progress=progress)
        artifact = _artifact(model_dir, out_root, cfg, family, spec, mmproj_type, text_rel,
                             mm_rel, text_facts, mm_facts, llama_cpp)
        # Verification runs the pair as a device does too: the runner reads this manifest.
        artifact.save(manifest)
        if verify:
            from edgevlm.export.gguf_export.verify import verify_export

            artifact.parity = verify_export(
                model_dir, text_path, mm_path, family=family, quant=spec.name,
                mmproj_type=mmproj_type, io=mm_facts["io"], samples=samples,
                gen_tokens=gen_tokens, text_arch=text_facts["arch"],
                intermediate=text_facts["intermediate"], export_root=out_root)
            artifact.save(manifest)
    except BaseException:
        for path in (text_path, mm_path, manifest):
            path.unlink(missing_ok=True)
        raise
    finally:
        if text_facts.get("intermediate"):
            text_facts["intermediate"].unlink(missing_ok=True)
    return artifact


def _artifact(model_dir: Path, out_root: Path, cfg: dict, family: str, spec, mmproj_type: str,
              text_rel: Path, mm_rel: Path, text_facts: dict, mm_facts: dict,
              llama_cpp) -> ExportArtifact:
    """The manifest of the written pair (parity still empty)."""
    from edgevlm.export.manifest import checkpoint_records, file_entry, tool_versions

    versions = tool_versions("gguf", "llama-cpp-python", "safetensors")
    versions["llama.cpp"] = _llama_build_info(llama_cpp)
    tcfg = cfg["text_config"]
    artifact = ExportArtifact(
        target="gguf",
        files=[file_entry(out_root, out_root / text_rel, "text_model", spec.name),
               file_entry(out_root, out_root / mm_rel, "mmproj", mmproj_type)],
        base_model="",
        io=ExportIO(family=family, image_token_id=families.image_token_id(cfg),
                    image_token=families.family(family).image_token,
                    num_layers=text_facts["n_layers"], hidden_size=int(tcfg["hidden_size"]),
                    vocab_size=int(tcfg["vocab_size"]),
                    files={"text_model": {spec.name: text_rel.as_posix()},
                           "mmproj": {mmproj_type: mm_rel.as_posix()}},
                    gguf={"text_arch": text_facts["arch"], "projector_type": mm_facts["projector"],
                          "image": mm_facts["io"], "tokenizer": text_facts["tokenizer"]}),
        quantization={"decoder": spec.name, "decoder_method": spec.method,
                      "vision_encoder": mmproj_type,
                      "text_tensor_types": _count(text_facts["types"]),
                      "fallback_tensors": text_facts["fallback"],
                      "mmproj_tensor_types": _count(mm_facts["types"]),
                      "mmproj_fallback_tensors": mm_facts["fallback"]},
        versions=versions)
    artifact.plan, artifact.recovery, artifact.base_model = checkpoint_records(model_dir)
    return artifact


def _count(types: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _llama_build_info(llama_cpp) -> dict:
    info = {"llama_cpp_python": getattr(llama_cpp, "__version__", "?")}
    try:
        info["system_info"] = llama_cpp.llama_print_system_info().decode()
    except Exception:  # informational only
        pass
    return info
