"""Parity of an ONNX export with the PyTorch model it came from, on held-out samples."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from edgevlm.errors import VerificationError

# fp32 tolerances; logits scale with their magnitude, so the bound does too.
FEATURE_TOL = 1e-3
LOGITS_TOL = 1e-3


def torch_reference(vlm, sample, gen_tokens: int) -> dict:
    """What PyTorch computes for one sample: inputs (numpy), image features, last-position
    prefill logits, greedy tokens (EOS ignored, so every step is compared)."""
    import torch

    from edgevlm.prompting import encode, model_inputs

    batch = model_inputs(encode(vlm, [sample]))
    model = vlm.model
    with torch.no_grad():
        logits = model(**batch).logits[0, -1].float().numpy()
        features = _image_features(model, batch)
        gen = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
        gen.eos_token_id = []  # None falls back to the model's EOS; [] really disables it
        gen.do_sample = False
        gen.max_new_tokens = gen_tokens
        gen.min_new_tokens = None
        if gen.pad_token_id is None:
            gen.pad_token_id = 0
        out = model.generate(**batch, generation_config=gen)
    tokens = out[0, batch["input_ids"].shape[1]:].tolist()
    inputs = {k: v.numpy() for k, v in batch.items() if hasattr(v, "numpy")}
    return {"inputs": inputs, "features": features, "logits": logits, "tokens": tokens}


def _image_features(model, batch) -> np.ndarray | None:
    inner = model.model
    if "pixel_values" not in batch or not hasattr(inner, "get_image_features"):
        return None
    params = inspect.signature(inner.get_image_features).parameters
    kwargs = {k: v for k, v in batch.items() if k in params}
    out = inner.get_image_features(**kwargs)
    feats = getattr(out, "pooler_output", out)
    hidden = model.config.get_text_config().hidden_size
    if isinstance(feats, (list, tuple)):
        feats = np.concatenate([f.reshape(-1, hidden).float().numpy() for f in feats])
    else:
        feats = feats.reshape(-1, hidden).float().numpy()
    return feats


def verify_export(vlm, folder: Path, samples, quants: list[str], vision_quant: str,
                  gen_tokens: int) -> dict:
    """Run the export in onnxruntime against PyTorch; raise VerificationError beyond tolerance.

    fp32: image features and prefill logits within tolerance, greedy tokens equal for
    `gen_tokens` steps. Quantized variants: teacher-forced along PyTorch's greedy path, their
    top-1 agreement is recorded (quantization changes tokens; that is measured, not failed).
    """
    from edgevlm.runtimes.ort_generate import OnnxVLM

    refs = [torch_reference(vlm, s, gen_tokens) for s in samples]
    fp32 = OnnxVLM(folder)
    feat_diff, logit_diff, equal_steps, failures = 0.0, 0.0, [], []
    for i, ref in enumerate(refs):
        run = fp32.generate(ref["inputs"], gen_tokens)
        if ref["features"] is not None and run.image_features is not None:
            d = float(np.abs(run.image_features - ref["features"]).max())
            feat_diff = max(feat_diff, d)
            if d > FEATURE_TOL * max(1.0, float(np.abs(ref["features"]).max())):
                failures.append(f"sample {i}: image features differ by {d:.3g}")
        d = float(np.abs(run.prefill_logits - ref["logits"]).max())
        logit_diff = max(logit_diff, d)
        if d > LOGITS_TOL * max(1.0, float(np.abs(ref["logits"]).max())):
            failures.append(f"sample {i}: prefill logits differ by {d:.3g}")
        same = _common_prefix(run.tokens, ref["tokens"])
        equal_steps.append(same)
        if same < gen_tokens:
            failures.append(f"sample {i}: greedy tokens diverge at step {same} "
                            f"(onnx {run.tokens[:same + 1]} vs torch {ref['tokens'][:same + 1]})")
    parity = {"samples": len(refs), "gen_tokens": gen_tokens,
              "image_features_max_abs_diff": feat_diff, "prefill_logits_max_abs_diff": logit_diff,
              "greedy_tokens_equal": not any("greedy" in f for f in failures),
              "greedy_equal_steps": equal_steps,
              "tolerance": {"image_features": FEATURE_TOL, "logits": LOGITS_TOL,
                            "scaled_by": "max(1, max|reference|)"}}
    if failures:
        raise VerificationError("ONNX export disagrees with PyTorch: " + "; ".join(failures),
                                "report it with the model's config.json; the export was not written")
    variants = {}
    for quant in quants:
        if quant == "none":
            continue
        variants[f"decoder_{quant}"] = _top1(OnnxVLM(folder, quant=quant), refs)
    if vision_quant != "none":
        variants[f"vision_encoder_{vision_quant}"] = _top1(OnnxVLM(folder, vision_quant=vision_quant), refs)
    parity["quantized"] = variants
    return parity


def _top1(runner, refs) -> dict:
    hits = total = 0
    logit_diff = 0.0
    for ref in refs:
        run = runner.generate(ref["inputs"], forced_tokens=ref["tokens"])
        hits += sum(int(a == b) for a, b in zip(run.argmax, ref["tokens"], strict=False))
        total += len(ref["tokens"])
        logit_diff = max(logit_diff, float(np.abs(run.prefill_logits - ref["logits"]).max()))
    return {"top1_agreement": hits / max(total, 1), "steps": total,
            "prefill_logits_max_abs_diff": logit_diff}


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
