"""Parity of the written GGUF pair with the PyTorch model, measured in llama.cpp itself
through the runner's driver (runtimes/llamacpp_runner.py), against export/parity.py's
reference and tolerances."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgevlm.errors import VerificationError
from edgevlm.export.parity import (
    IMAGE_GREEDY,
    IMAGE_TOLERANCES,
    TOLERANCES,
    ParityReport,
    Tolerance,
    runner_shortfall,
    scaled_error,
    torch_reference,
)
from edgevlm.runtimes import families
from edgevlm.runtimes import llamacpp_runner as llamacpp

# family -> this llama.cpp build's known defect for it (from the family table).
KNOWN = {f.name: f.known_defects["gguf"] for f in families.TABLE if "gguf" in f.known_defects}


def native_image(family: str, cfg: dict, io: dict, image):
    """The sample image resized to a size both preprocessors leave untouched, so parity
    measures the model and not two resize implementations."""
    from PIL import Image

    # Qwen: 224 px = 8x8 merged tokens, enough for several 112-px attention windows (2.5).
    size = {"smolvlm": io.get("longest_edge"), "llava": io.get("image_size"),
            "gemma3": io.get("image_size")}.get(family) or 224
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def greedy(decoder, ids, mask, image_embs, forced: list[int], grid=None) -> list[int]:
    """Feed ids (image positions replaced by image_embs; one image, M-RoPE `grid` if given),
    then step along `forced` (PyTorch's greedy tokens): llama.cpp's argmax at every step."""
    run_start, k = 0, 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[run_start]:
            if mask[run_start]:
                decoder.embeddings(image_embs[k: k + i - run_start], grid)
                k += i - run_start
            else:
                decoder.tokens(ids[run_start:i])
            run_start = i
    out = []
    for step, tok in enumerate(forced):
        out.append(int(np.argmax(decoder.last_logits())))
        if step + 1 < len(forced):
            decoder.tokens([tok])
    return out


@contextmanager
def text_rms_eps(vlm, value: float | None):
    """Temporarily set every text RMSNorm epsilon to `value` (None: leave as is)."""
    mods = [m for m in vlm.adapter.text_stack(vlm.model).modules()
            if hasattr(m, "variance_epsilon")] if value is not None else []
    old = [m.variance_epsilon for m in mods]
    for m in mods:
        m.variance_epsilon = value
    try:
        yield
    finally:
        for m, eps in zip(mods, old, strict=True):
            m.variance_epsilon = eps


def _text_logits(vlm, ids):
    import torch

    with torch.no_grad():
        return vlm.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _rms_eps_ignored(vlm, ids, got, ref) -> bool:
    """True when llama.cpp's logits match the PyTorch model with text RMSNorm eps 0 far better
    than the real model: the build ignores the GGUF's epsilon (a llama.cpp bug, not the file)."""
    with text_rms_eps(vlm, 0.0):
        zero = _text_logits(vlm, ids)
    return float(np.abs(zero - got).max()) * 4 < float(np.abs(ref - got).max())


def _reference(vlm, family: str, io: dict, sample, gen_tokens: int) -> dict:
    """The shared PyTorch reference on the sample's picture at its native size, plus the
    logits at every position of the prompt and answer as plain text (no image)."""
    text = f"{sample.prompt} {sample.answer or ''}".strip()
    ids = vlm.processor.tokenizer(text, add_special_tokens=False).input_ids
    image = native_image(family, {}, io, sample.image)
    ref = torch_reference(vlm, sample, gen_tokens, image=image)
    return {"text": text, "ids": ids, "logits": _text_logits(vlm, ids), "image": image,
            "inputs": ref["inputs"], "seq": ref["ids"], "mask": ref["mask"],
            "features": ref["features"],
            "gen": ref["tokens"], "grid": ref["grid"]}


def _measure_text(llm, refs, embs, family: str) -> dict:
    """One text GGUF against the references: logits error, top-1, teacher-forced greedy."""
    out = {"logits": 0.0, "logits_abs": 0.0, "top1": [], "greedy_hits": 0, "greedy_steps": 0,
           "greedy_tokens_equal": True, "tokenizer_matches": True}
    for ref, emb in zip(refs, embs, strict=True):
        out["tokenizer_matches"] &= llamacpp.tokenize(llm, ref["text"]) == ref["ids"]
        got = llamacpp.text_logits(llm, ref["ids"])
        want = ref["logits"]
        err, diff = scaled_error(got, want)
        out["logits_abs"] = max(out["logits_abs"], diff)
        out["logits"] = max(out["logits"], err)
        out["top1"].append(float((want.argmax(-1) == got.argmax(-1)).mean()))
        decoder = llamacpp.Decoder(llm, non_causal_images=families.family(family).bidirectional_images)
        pred = greedy(decoder, ref["seq"], ref["mask"], emb, ref["gen"], ref["grid"])
        out["greedy_hits"] += sum(int(a == b) for a, b in zip(pred, ref["gen"], strict=True))
        out["greedy_steps"] += len(ref["gen"])
        out["greedy_tokens_equal"] &= pred == ref["gen"]
        out.setdefault("greedy_tokens", {"torch": ref["gen"], "llama.cpp": pred})
    out["top1"] = float(np.mean(out["top1"]))
    return out


def _eps_in_llama_cpp(vlm, f32_file, sample, family: str) -> float | None:
    """0.0 when the f32 text file shows that this llama.cpp build ignores the text RMSNorm
    epsilon, for a family whose table entry says it may (`gguf_rms_eps_ignored`; detected, not
    assumed): then PyTorch with eps 0 is the reference. None otherwise."""
    if f32_file is None or not families.family(family).gguf_rms_eps_ignored:
        return None
    text = f"{sample.prompt} {sample.answer or ''}".strip()
    ids = vlm.processor.tokenizer(text, add_special_tokens=False).input_ids
    llm = llamacpp.open_text(f32_file, n_ctx=llamacpp.context_size(len(ids)))
    got = llamacpp.text_logits(llm, ids)
    del llm
    return 0.0 if _rms_eps_ignored(vlm, ids, got, _text_logits(vlm, ids)) else None


def _text_checks(report: ParityReport, label: str, m: dict, tol: Tolerance) -> None:
    greedy = m["greedy_hits"] / max(1, m["greedy_steps"])
    report.add(f"{label} logits error", m["logits"], "<=", tol.logits)
    report.add(f"{label} top-1 agreement", m["top1"], ">=", tol.top1)
    report.add(f"{label} greedy agreement ({m['greedy_steps']} steps, with image)", greedy, ">=",
               tol.greedy)
    report.add(f"{label} tokenizer equal to Hugging Face", float(m["tokenizer_matches"]), ">=",
               1.0)


def verify_export(model_dir: Path, text_path: Path, mm_path: Path, *, family: str, quant: str,
                  mmproj_type: str, io: dict, samples=None, gen_tokens: int = 16,
                  text_arch: str | None = None, intermediate: Path | None = None,
                  export_root: Path | None = None) -> dict:
    """Measure the GGUF pair in llama.cpp against PyTorch at the precision each file was written
    in (`TOLERANCES[quant]`, `IMAGE_TOLERANCES[mmproj_type]`; an f32 `intermediate` that a
    K-quant was made from is held to f32), and, with `export_root` (a folder whose
    manifest.json lists the pair), the prompt path a user runs: the llama.cpp runner's chat
    template and mtmd preprocessing, greedy. Raise VerificationError naming every check that
    failed; returns the ParityReport as JSON, every check with its value and tolerance."""
    import torch

    from edgevlm.calib import load_calibration
    from edgevlm.loader import load

    torch.manual_seed(0)
    vlm = load(str(model_dir))
    samples = list(samples or load_calibration("builtin:4", seed=0).heldout[:1])
    f32_file = intermediate or (text_path if quant == "f32" else None)
    eps = _eps_in_llama_cpp(vlm, f32_file, samples[0], family)
    with text_rms_eps(vlm, eps):
        refs = [_reference(vlm, family, io, s, gen_tokens) for s in samples]
    # The longest sequence fed: a text sample, or an image prompt plus its greedy steps.
    n_ctx = llamacpp.context_size(max(max(len(r["ids"]), len(r["seq"]) + len(r["gen"]))
                                      for r in refs))
    files = ([(f"text f32 intermediate of {quant}", intermediate, "f32")] if intermediate
             else []) + [(f"text {quant}", text_path, quant)]
    report = ParityReport(target="gguf", samples=len(refs))
    report.measured = {"quant": quant, "mmproj_type": mmproj_type, "kv_cache": "f32",
                       "n_ctx": n_ctx}
    if eps is not None:
        report.reference = (f"pytorch with text RMSNorm eps 0: this llama.cpp build "
                            f"ignores {text_arch}.attention.layer_norm_rms_epsilon")
    embs = None
    for label, path, kind in files:
        llm = llamacpp.open_text(path, n_ctx=n_ctx)
        if embs is None:  # the mmproj's features, once (mtmd needs a text model to attach to)
            embs = [llamacpp.image_embeddings(llm, mm_path, r["image"]) for r in refs]
            _check_image(report, refs, embs, mmproj_type)
        m = _measure_text(llm, refs, embs, family)
        del llm
        tol = TOLERANCES[kind]
        spec = families.family(family)
        if kind == "f32" and spec.gguf_rms_eps_ignored and eps is None:
            tol = Tolerance(spec.gguf_f32_logits_tol, tol.top1, tol.greedy)
        if mmproj_type in IMAGE_GREEDY:  # greedy steps see the mmproj's features: its precision too
            tol = Tolerance(tol.logits, tol.top1, min(tol.greedy, IMAGE_GREEDY[mmproj_type]))
        _text_checks(report, label, m, tol)
        if path == text_path and export_root is not None:
            _runner_check(report, vlm, export_root, refs, samples, eps, n_ctx, tol, mmproj_type)
        if path == text_path:  # the headline figures are the final file's
            report.measured.update(
                text_logits_max_abs_diff=m["logits_abs"], text_logits_error=m["logits"],
                text_top1_agreement=m["top1"], tokenizer_matches=m["tokenizer_matches"],
                greedy_tokens_equal=m["greedy_tokens_equal"],
                greedy_agreement=m["greedy_hits"] / max(1, m["greedy_steps"]),
                greedy_steps=m["greedy_steps"], greedy_tokens=m.get("greedy_tokens"))
        else:
            report.measured["intermediate"] = {"logits_error": m["logits"], "top1": m["top1"],
                                               "greedy_tokens_equal": m["greedy_tokens_equal"]}
    why = KNOWN.get(family)
    report.raise_if_failed(
        "GGUF export disagrees with PyTorch in llama.cpp" + (f" (known cause: {why})" if why
                                                             else ""),
        "nothing was kept; " + ("this is a llama.cpp defect: export --target onnx, or pass "
                                "--no-verify to keep the files anyway" if why else
                                "report this with the model's config.json"))
    return report.to_dict()


def _runner_check(report: ParityReport, vlm, root: Path, refs, samples, eps, n_ctx: int,
                  tol: Tolerance, mmproj_type: str) -> None:
    """The runner a user runs (GGUF chat template, mtmd's image chunks, its own context; an F32
    KV cache, as for the files), greedy with EOS ignored; PyTorch, teacher-forced along its
    tokens, must rank each of them within the logits bound of its best (random weights tie
    logits, so exact argmax equality would test float noise). Its image features are the
    mmproj's: the bound is the looser of the text file's and the mmproj's."""
    from edgevlm.runtimes.llamacpp_runner import LlamaCppRunner
    from edgevlm.types import ExportArtifact

    artifact = ExportArtifact.load(root / "manifest.json")
    runner = LlamaCppRunner(root, artifact, threads=llamacpp.threads_for(
        root / artifact.io.path("text_model")), n_ctx=2 * n_ctx, kv_f32=True)
    runner.load()
    worst, steps, tokens = 0.0, 0, []
    try:
        for ref, sample in zip(refs, samples, strict=True):
            got = runner.generate(ref["image"], sample.prompt, max_tokens=len(ref["gen"]),
                                  ignore_eos=True).tokens
            with text_rms_eps(vlm, eps):
                worst = max(worst, runner_shortfall(vlm, ref, got))
            steps += len(got)
            tokens.append(got)
    finally:
        runner.close()
    bound = max(tol.logits, TOLERANCES[mmproj_type].logits if mmproj_type != "f32" else 0.0)
    report.add(f"runner greedy picks below PyTorch's best ({steps} steps, chat template + mtmd)",
               worst, "<=", bound)
    report.measured["runner_tokens"] = tokens


def _check_image(report: ParityReport, refs, embs, mmproj_type: str) -> None:
    for ref, emb in zip(refs, embs, strict=True):
        if emb.shape != ref["features"].shape:
            raise VerificationError(
                f"llama.cpp made {emb.shape[0]} image embeddings, PyTorch "
                f"{ref['features'].shape[0]}",
                "the mmproj preprocessing metadata does not match the processor")
    diff = max(float(np.abs(e - r["features"]).max()) for r, e in zip(refs, embs, strict=True))
    scale = max(float(np.abs(r["features"]).max()) for r in refs)
    report.measured.update(image_embedding_max_abs_diff=diff, image_embedding_max_abs=scale)
    report.add(f"mmproj {mmproj_type} image features error", diff / max(1.0, scale), "<=",
               IMAGE_TOLERANCES[mmproj_type])
