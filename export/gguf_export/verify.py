"""Parity of the written GGUF pair with the PyTorch model, measured in llama.cpp itself."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm.errors import VerificationError
from edgevlm.export.gguf_export import llamacpp
from edgevlm.runtimes import families


@dataclass(frozen=True)
class TextTolerance:
    """What a text GGUF of one type must reach against the fp32 PyTorch model.

    logits: max |llama.cpp - PyTorch| over every position of the text samples, divided by
    max(1, max |PyTorch|); top1: share of those positions whose argmax agrees; greedy: share
    of greedy steps with the image (teacher-forced along PyTorch's greedy tokens) whose
    argmax agrees. Quantized bounds sit well below what the tiny and full-size random models
    measure, and far above a broken file (wrong layout: agreement ~ 1/vocab). Random weights
    give near-tied logits, so 4-bit argmax agreement there is low (q4_0 on the hidden-64 tiny
    SmolVLM: greedy 0.19); the logits bound is the sharp check: it implies every pick is
    within twice the bound of PyTorch's best.
    """

    logits: float
    top1: float
    greedy: float


TEXT_TOLERANCES = {
    "f32": TextTolerance(1e-3, 1.0, 1.0),
    "f16": TextTolerance(1e-2, 0.9, 0.9),
    "bf16": TextTolerance(5e-2, 0.8, 0.8),
    "q8_0": TextTolerance(5e-2, 0.8, 0.8),
    "q6_k": TextTolerance(0.2, 0.5, 0.3),
    "q5_k_m": TextTolerance(0.3, 0.4, 0.2),
    "q4_0": TextTolerance(0.6, 0.3, 0.1),
    "q4_k_m": TextTolerance(0.6, 0.3, 0.1),
    "q4_k_s": TextTolerance(0.6, 0.3, 0.1),
    "q3_k_m": TextTolerance(1.0, 0.2, 0.05),
}
# qwen2vl in this llama.cpp build runs text RMSNorm without epsilon (see _rms_eps_ignored):
# at f32 its logits are held to 1e-2 unless the eps-0 reference is detected.
F32_LOGITS_QWEN = 1e-2
# mmproj: max |llama.cpp - PyTorch| of the image features, divided by max(1, max |features|)
# (llama.cpp runs patch convolutions in F16: relative error ~2^-11 whatever the scale).
IMAGE_TOLERANCES = {"f32": 1e-3, "f16": 5e-3, "q8_0": 5e-2}
# family -> this llama.cpp build's known defect for it (from the family table).
KNOWN = {f.name: f.known_defects["gguf"] for f in families.TABLE if "gguf" in f.known_defects}
# Text archs whose llama.cpp build may ignore {arch}.attention.layer_norm_rms_epsilon (this
# one runs qwen2vl with eps 0). Detected, not assumed: see _rms_eps_ignored.
EPS_SUSPECT_ARCHS = {"qwen2vl"}


def native_image(family: str, cfg: dict, io: dict, image):
    """The sample image resized to a size both preprocessors leave untouched, so parity
    measures the model and not two resize implementations."""
    from PIL import Image

    # Qwen: 224 px = 8x8 merged tokens, enough for several 112-px attention windows (2.5).
    size = {"smolvlm": io.get("longest_edge"), "llava": io.get("image_size"),
            "gemma3": io.get("image_size")}.get(family) or 224
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def torch_reference(vlm, image, prompt: str, gen_tokens: int):
    """(input_ids, image-token mask, image features at the image-token positions, greedy
    continuation, M-RoPE grid (rows, cols) of merged patches or None)."""
    import torch

    from edgevlm.prompting import chat_batch, chat_text

    proc = vlm.processor
    batch = chat_batch(proc, [chat_text(proc, prompt)], [[image]], return_tensors="pt")
    captured = {}
    stack = vlm.adapter.text_stack(vlm.model)
    hook = stack.register_forward_pre_hook(
        lambda _m, _a, kw: captured.update(embeds=kw.get("inputs_embeds")), with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.model(**batch)
    finally:
        hook.remove()
    mask = vlm.adapter.visual_mask(batch["input_ids"], vlm.config)[0]
    feats = captured["embeds"][0][mask].float().numpy()
    with torch.no_grad():
        out = vlm.model.generate(**batch, max_new_tokens=gen_tokens, do_sample=False)
    ids = batch["input_ids"][0].tolist()
    grid = None
    if "image_grid_thw" in batch:  # Qwen-VL: image positions are (t, row, col) M-RoPE sections
        merge = int(getattr(vlm.config.vision_config, "spatial_merge_size", 2))
        _t, rows, cols = (int(v) for v in batch["image_grid_thw"][0])
        grid = (rows // merge, cols // merge)
    return ids, mask.tolist(), feats, out[0, len(ids):].tolist(), grid


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
    text = f"{sample.prompt} {sample.answer or ''}".strip()
    ids = vlm.processor.tokenizer(text, add_special_tokens=False).input_ids
    image = native_image(family, {}, io, sample.image)
    seq, mask, feats, gen, grid = torch_reference(vlm, image, sample.prompt, gen_tokens)
    return {"text": text, "ids": ids, "logits": _text_logits(vlm, ids), "image": image,
            "seq": seq, "mask": mask, "features": feats, "gen": gen, "grid": grid}


def _measure_text(llm, refs, embs, family: str) -> dict:
    """One text GGUF against the references: logits error, top-1, teacher-forced greedy."""
    out = {"logits": 0.0, "logits_abs": 0.0, "top1": [], "greedy_hits": 0, "greedy_steps": 0,
           "greedy_tokens_equal": True, "tokenizer_matches": True}
    for ref, emb in zip(refs, embs, strict=True):
        out["tokenizer_matches"] &= llamacpp.tokenize(llm, ref["text"]) == ref["ids"]
        got = llamacpp.text_logits(llm, ref["ids"])
        want = ref["logits"]
        diff = float(np.abs(want - got).max())
        out["logits_abs"] = max(out["logits_abs"], diff)
        out["logits"] = max(out["logits"], diff / max(1.0, float(np.abs(want).max())))
        out["top1"].append(float((want.argmax(-1) == got.argmax(-1)).mean()))
        decoder = llamacpp.Decoder(llm, non_causal_images=families.family(family).bidirectional_images)
        pred = greedy(decoder, ref["seq"], ref["mask"], emb, ref["gen"], ref["grid"])
        out["greedy_hits"] += sum(int(a == b) for a, b in zip(pred, ref["gen"], strict=True))
        out["greedy_steps"] += len(ref["gen"])
        out["greedy_tokens_equal"] &= pred == ref["gen"]
        out.setdefault("greedy_tokens", {"torch": ref["gen"], "llama.cpp": pred})
    out["top1"] = float(np.mean(out["top1"]))
    return out


def _eps_in_llama_cpp(vlm, f32_file, sample, text_arch) -> float | None:
    """0.0 when the f32 text file shows that this llama.cpp build ignores the RMSNorm epsilon
    of `text_arch` (then PyTorch with eps 0 is the reference); None otherwise."""
    if f32_file is None or text_arch not in EPS_SUSPECT_ARCHS:
        return None
    text = f"{sample.prompt} {sample.answer or ''}".strip()
    ids = vlm.processor.tokenizer(text, add_special_tokens=False).input_ids
    llm = llamacpp.open_text(f32_file, n_ctx=llamacpp.context_size(len(ids)))
    got = llamacpp.text_logits(llm, ids)
    del llm
    return 0.0 if _rms_eps_ignored(vlm, ids, got, _text_logits(vlm, ids)) else None


def _check(what: str, value: float, op: str, tol: float) -> dict:
    ok = value <= tol if op == "<=" else value >= tol
    return {"what": what, "value": value, "op": op, "tolerance": tol, "ok": bool(ok)}


def _text_checks(label: str, m: dict, tol: TextTolerance) -> list[dict]:
    greedy = m["greedy_hits"] / max(1, m["greedy_steps"])
    return [_check(f"{label} logits error", m["logits"], "<=", tol.logits),
            _check(f"{label} top-1 agreement", m["top1"], ">=", tol.top1),
            _check(f"{label} greedy agreement ({m['greedy_steps']} steps, with image)",
                   greedy, ">=", tol.greedy),
            _check(f"{label} tokenizer equal to Hugging Face", float(m["tokenizer_matches"]),
                   ">=", 1.0)]


def verify_export(model_dir: Path, text_path: Path, mm_path: Path, *, family: str, quant: str,
                  mmproj_type: str, io: dict, samples=None, gen_tokens: int = 16,
                  text_arch: str | None = None, intermediate: Path | None = None) -> dict:
    """Measure the GGUF pair in llama.cpp against PyTorch at the precision each file was written
    in (`TEXT_TOLERANCES[quant]`, `IMAGE_TOLERANCES[mmproj_type]`; an f32 `intermediate` that
    a K-quant was made from is held to f32). Raise VerificationError naming every check that
    failed; the returned record lists every check with its value and tolerance."""
    import torch

    from edgevlm.calib import load_calibration
    from edgevlm.loader import load

    torch.manual_seed(0)
    vlm = load(str(model_dir))
    samples = list(samples or load_calibration("builtin:4", seed=0).heldout[:1])
    f32_file = intermediate or (text_path if quant == "f32" else None)
    eps = _eps_in_llama_cpp(vlm, f32_file, samples[0], text_arch)
    with text_rms_eps(vlm, eps):
        refs = [_reference(vlm, family, io, s, gen_tokens) for s in samples]
    # The longest sequence fed: a text sample, or an image prompt plus its greedy steps.
    n_ctx = llamacpp.context_size(max(max(len(r["ids"]), len(r["seq"]) + len(r["gen"]))
                                      for r in refs))
    files = ([(f"text f32 intermediate of {quant}", intermediate, "f32")] if intermediate
             else []) + [(f"text {quant}", text_path, quant)]
    result = {"quant": quant, "mmproj_type": mmproj_type, "n_samples": len(refs),
              "kv_cache": "f32", "reference": "pytorch", "n_ctx": n_ctx, "checks": []}
    if eps is not None:
        result["reference"] = (f"pytorch with text RMSNorm eps 0: this llama.cpp build "
                               f"ignores {text_arch}.attention.layer_norm_rms_epsilon")
    embs = None
    for label, path, kind in files:
        llm = llamacpp.open_text(path, n_ctx=n_ctx)
        if embs is None:  # the mmproj's features, once (mtmd needs a text model to attach to)
            embs = [llamacpp.image_embeddings(llm, mm_path, r["image"]) for r in refs]
            _check_image(result, refs, embs, mmproj_type)
        m = _measure_text(llm, refs, embs, family)
        del llm
        tol = TEXT_TOLERANCES[kind]
        if kind == "f32" and family.startswith("qwen") and eps is None:
            tol = TextTolerance(F32_LOGITS_QWEN, tol.top1, tol.greedy)
        if mmproj_type != "f32":  # greedy steps see the mmproj's features: its precision too
            img = TEXT_TOLERANCES["f16" if mmproj_type == "f16" else "q8_0"]
            tol = TextTolerance(tol.logits, tol.top1, min(tol.greedy, img.greedy))
        result["checks"] += _text_checks(label, m, tol)
        if path == text_path:  # the headline figures are the final file's
            result.update(text_logits_max_abs_diff=m["logits_abs"], text_logits_error=m["logits"],
                          text_top1_agreement=m["top1"], tokenizer_matches=m["tokenizer_matches"],
                          greedy_tokens_equal=m["greedy_tokens_equal"],
                          greedy_agreement=m["greedy_hits"] / max(1, m["greedy_steps"]),
                          greedy_steps=m["greedy_steps"],
                          greedy_tokens=m.get("greedy_tokens"))
        else:
            result["intermediate"] = {"logits_error": m["logits"], "top1": m["top1"],
                                      "greedy_tokens_equal": m["greedy_tokens_equal"]}
    failures = [c for c in result["checks"] if not c["ok"]]
    result["passed"] = not failures
    if failures:
        why = KNOWN.get(family)
        raise VerificationError(
            "GGUF export disagrees with PyTorch in llama.cpp: " + "; ".join(
                f"{c['what']} {c['value']:.3g} (needs {c['op']} {c['tolerance']:.3g})"
                for c in failures) + (f" (known cause: {why})" if why else ""),
            "nothing was kept; " + ("this is a llama.cpp defect: export --target onnx, or pass "
                                    "--no-verify to keep the files anyway" if why else
                                    "report this with the model's config.json"))
    return result


def _check_image(result: dict, refs, embs, mmproj_type: str) -> None:
    for ref, emb in zip(refs, embs, strict=True):
        if emb.shape != ref["features"].shape:
            raise VerificationError(
                f"llama.cpp made {emb.shape[0]} image embeddings, PyTorch "
                f"{ref['features'].shape[0]}",
                "the mmproj preprocessing metadata does not match the processor")
    diff = max(float(np.abs(e - r["features"]).max()) for r, e in zip(refs, embs, strict=True))
    scale = max(float(np.abs(r["features"]).max()) for r in refs)
    result.update(image_embedding_max_abs_diff=diff, image_embedding_max_abs=scale)
    result["checks"].append(_check(f"mmproj {mmproj_type} image features error",
                                   diff / max(1.0, scale), "<=", IMAGE_TOLERANCES[mmproj_type]))
