"""Parity of the written GGUF pair with the PyTorch model, measured in llama.cpp itself."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgevlm.errors import VerificationError
from edgevlm.export.gguf_export import llamacpp

TEXT_TOL = {"qwen2-vl": 1e-2, "qwen2.5-vl": 1e-2}  # llama.cpp's qwen2vl RMSNorm, below
# Absolute, for features of magnitude <= 1; scaled by the features' magnitude above that
# (llama.cpp runs patch convolutions in F16: relative error ~2^-11 whatever the scale).
IMAGE_TOL = 1e-3
KNOWN = {
    "llava": "llama.cpp's llava graph (tools/mtmd/models/llava.cpp) concatenates the CLIP class "
             "token AFTER the patches while positions and the patch selection still assume it "
             "first, so this llama.cpp build computes shifted image features for every CLIP "
             "LLaVA; the mmproj file itself is correct",
}
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

    from edgevlm.prompting import chat_text

    proc = vlm.processor
    batch = proc(text=[chat_text(proc, prompt)], images=[[image]], return_tensors="pt")
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


def _eos_ids(vlm) -> set[int]:
    eos = vlm.model.generation_config.eos_token_id
    if eos is None:
        eos = vlm.processor.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def greedy(decoder, ids, mask, image_embs, n: int, eos: set[int], grid=None) -> list[int]:
    """Feed ids (image positions replaced by image_embs; one image, M-RoPE `grid` if given)
    and decode n greedy tokens."""
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
    for _ in range(n):
        tok = int(np.argmax(decoder.last_logits()))
        out.append(tok)
        if tok in eos:
            break
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


def verify_export(model_dir: Path, text_path: Path, mm_path: Path, *, family: str, quant: str,
                  mmproj_type: str, io: dict, samples=None, gen_tokens: int = 16,
                  text_arch: str | None = None) -> dict:
    """Measure llama.cpp vs PyTorch; raise VerificationError beyond tolerance (tolerances apply
    at f32; quantized exports only record their agreement)."""
    import torch

    from edgevlm.calib import load_calibration
    from edgevlm.loader import load

    torch.manual_seed(0)
    vlm = load(str(model_dir))
    samples = list(samples or load_calibration("builtin:4", seed=0).heldout[:1])
    llm = llamacpp.open_text(text_path)
    result = {"quant": quant, "mmproj_type": mmproj_type, "n_samples": len(samples),
              "kv_cache": "f32", "reference": "pytorch",
              "text_logits_max_abs_diff": 0.0, "text_top1_agreement": 1.0,
              "image_embedding_max_abs_diff": 0.0, "image_embedding_max_abs": 0.0,
              "greedy_tokens_equal": True, "greedy_steps": 0, "tokenizer_matches": True}
    failures, top1, eps = [], [], None
    for sample in samples:
        text = f"{sample.prompt} {sample.answer or ''}".strip()
        ids = vlm.processor.tokenizer(text, add_special_tokens=False).input_ids
        result["tokenizer_matches"] &= llamacpp.tokenize(llm, text) == ids
        ref = _text_logits(vlm, ids)
        got = llamacpp.text_logits(llm, ids)
        result["text_logits_max_abs_diff"] = max(result["text_logits_max_abs_diff"],
                                                 float(np.abs(ref - got).max()))
        top1.append(float((ref.argmax(-1) == got.argmax(-1)).mean()))
        if eps is None and quant == "f32" and text_arch in EPS_SUSPECT_ARCHS \
                and _rms_eps_ignored(vlm, ids, got, ref):
            eps = 0.0
            result["reference"] = (f"pytorch with text RMSNorm eps 0: this llama.cpp build "
                                   f"ignores {text_arch}.attention.layer_norm_rms_epsilon")
        with text_rms_eps(vlm, eps):
            if eps is not None:
                result["text_logits_max_abs_diff_vs_reference"] = max(
                    result.get("text_logits_max_abs_diff_vs_reference", 0.0),
                    float(np.abs(_text_logits(vlm, ids) - got).max()))
            image = native_image(family, {}, io, sample.image)
            seq, mask, feats, ref_gen, grid = torch_reference(vlm, image, sample.prompt,
                                                              gen_tokens)
        embs = llamacpp.image_embeddings(llm, mm_path, image)
        if embs.shape != feats.shape:
            raise VerificationError(
                f"llama.cpp made {embs.shape[0]} image embeddings, PyTorch {feats.shape[0]}",
                "the mmproj preprocessing metadata does not match the processor")
        result["image_embedding_max_abs_diff"] = max(result["image_embedding_max_abs_diff"],
                                                     float(np.abs(embs - feats).max()))
        result["image_embedding_max_abs"] = max(result["image_embedding_max_abs"],
                                                float(np.abs(feats).max()))
        decoder = llamacpp.Decoder(llm, non_causal_images=family == "gemma3")
        got_gen = greedy(decoder, seq, mask, embs, gen_tokens, _eos_ids(vlm), grid)
        result["greedy_tokens_equal"] &= got_gen == ref_gen
        result["greedy_steps"] = max(result["greedy_steps"], len(ref_gen))
        result.setdefault("greedy_tokens", {"torch": ref_gen, "llama.cpp": got_gen})
    result["text_top1_agreement"] = float(np.mean(top1))
    del llm
    text_tol = TEXT_TOL.get(family, 1e-3)
    image_tol = IMAGE_TOL * max(1.0, result["image_embedding_max_abs"])
    result["tolerances"] = {"text_logits": text_tol, "image_embedding": image_tol}
    if quant == "f32" and result["text_logits_max_abs_diff"] > text_tol:
        failures.append(f"text logits differ by {result['text_logits_max_abs_diff']:.3g} "
                        f"(tolerance {text_tol})")
    if mmproj_type == "f32" and result["image_embedding_max_abs_diff"] > image_tol:
        failures.append(f"image embeddings differ by {result['image_embedding_max_abs_diff']:.3g} "
                        f"(tolerance {image_tol:.3g})")
    if not result["tokenizer_matches"]:
        failures.append("llama.cpp tokenizes the sample text differently from the HF tokenizer "
                        "(pre-tokenizer or vocabulary metadata)")
    if quant == "f32" and mmproj_type == "f32" and not result["greedy_tokens_equal"]:
        failures.append("greedy tokens with an image differ from PyTorch")
    result["passed"] = not failures
    if failures:
        why = KNOWN.get(family)
        raise VerificationError(
            "GGUF export disagrees with PyTorch in llama.cpp: " + "; ".join(failures)
            + (f" (known cause: {why})" if why else ""),
            "report this with the manifest; the files were not kept")
    return result
