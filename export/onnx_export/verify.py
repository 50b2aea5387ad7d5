"""Parity of an ONNX export with the PyTorch model it came from, on held-out samples, through
the runner's own OnnxVLM (export/parity.py: reference, tolerances, report)."""

from __future__ import annotations

from pathlib import Path

from edgevlm.export.parity import (
    IMAGE_TOLERANCES,
    ONNX_PRECISION,
    TOLERANCES,
    ParityReport,
    common_prefix,
    runner_shortfall,
    scaled_error,
    torch_reference,
)

__all__ = ["torch_reference", "verify_export"]


def verify_export(vlm, folder: Path, samples, quants: list[str], vision_quant: str,
                  gen_tokens: int) -> dict:
    """Run the export in onnxruntime against PyTorch; raise VerificationError beyond tolerance.

    fp32: image features and prefill logits within the f32 tolerances, greedy tokens equal for
    `gen_tokens` steps. Quantized variants: teacher-forced along PyTorch's greedy path, their
    top-1 agreement and prefill logits error are recorded (quantization changes tokens; that
    is measured, not failed). Returns the ParityReport as JSON.
    """
    from edgevlm.runtimes.ort_generate import OnnxVLM

    refs = [torch_reference(vlm, s, gen_tokens) for s in samples]
    fp32 = OnnxVLM(folder)
    tol = TOLERANCES["f32"]
    feat, logit, feat_abs, logit_abs, equal_steps, tokens = 0.0, 0.0, 0.0, 0.0, [], None
    for ref in refs:
        run = fp32.generate(ref["inputs"], gen_tokens)
        if ref["features"] is not None and run.image_features is not None:
            err, diff = scaled_error(run.image_features, ref["features"])
            feat, feat_abs = max(feat, err), max(feat_abs, diff)
        err, diff = scaled_error(run.prefill_logits, ref["logits"])
        logit, logit_abs = max(logit, err), max(logit_abs, diff)
        equal_steps.append(common_prefix(run.tokens, ref["tokens"]))
        if tokens is None or equal_steps[-1] < gen_tokens:
            tokens = {"torch": ref["tokens"], "onnx": run.tokens}
    report = ParityReport(target="onnx", samples=len(refs))
    report.add("fp32 image features error", feat, "<=", IMAGE_TOLERANCES["f32"])
    report.add("fp32 prefill logits error", logit, "<=", tol.logits)
    report.add(f"fp32 greedy tokens equal ({gen_tokens} steps, with image)",
               min(equal_steps) / max(1, gen_tokens), ">=", tol.greedy)
    report.measured = {"image_features_max_abs_diff": feat_abs,
                       "prefill_logits_max_abs_diff": logit_abs,
                       "greedy_tokens_equal": min(equal_steps) >= gen_tokens,
                       "greedy_equal_steps": equal_steps, "greedy_tokens": tokens,
                       "gen_tokens": gen_tokens}
    same_prompt, worst = _runner_check(vlm, folder, refs, samples, gen_tokens, report)
    report.add("fp32 runner prompt tokens equal PyTorch's (its chat template and tokenizer)",
               float(same_prompt), ">=", 1.0)
    report.add(f"fp32 runner greedy picks below PyTorch's best ({gen_tokens * len(refs)} steps, "
               "numpy preprocessing)", worst, "<=", tol.logits)
    report.raise_if_failed("ONNX export disagrees with PyTorch",
                           "report it with the model's config.json; the export was not written")
    variants = [("decoder", q, OnnxVLM(folder, quant=q)) for q in quants if q != "none"]
    if vision_quant != "none":
        variants.append(("vision_encoder", vision_quant, OnnxVLM(folder, vision_quant=vision_quant)))
    quantized = {}
    for role, quant, runner in variants:
        top1, steps, err = _top1(runner, refs)
        precision = TOLERANCES[ONNX_PRECISION[quant]]
        report.add(f"{role} {quant} top-1 agreement ({steps} steps, teacher-forced)", top1, ">=",
                   precision.top1)
        report.add(f"{role} {quant} prefill logits error", err, "<=", precision.logits)
        quantized[f"{role}_{quant}"] = {"top1_agreement": top1, "steps": steps,
                                        "prefill_logits_error": err}
    report.measured["quantized"] = quantized
    return report.to_dict()


def _runner_check(vlm, folder: Path, refs, samples, gen_tokens: int,
                  report) -> tuple[bool, float]:
    """The runner a user runs on the fp32 graphs: its numpy preprocessing and tokenizer from
    the sample's picture and prompt, greedy with EOS ignored. Returns (its prompt's token ids
    are PyTorch's, the largest shortfall of its picks below PyTorch's best)."""
    from edgevlm.runtimes.ort_runner import OrtRunner
    from edgevlm.types import ExportArtifact

    root = Path(folder).parent
    runner = OrtRunner(root, ExportArtifact.load(root / "manifest.json"), decoder_quant="none",
                       vision_quant="none")
    runner.load()
    worst, tokens, same = 0.0, [], True
    for ref, sample in zip(refs, samples, strict=True):
        same &= runner.pre(sample.image, sample.prompt)["input_ids"][0].tolist() == ref["ids"]
        got = runner.generate(sample.image, sample.prompt, max_tokens=gen_tokens,
                              ignore_eos=True).tokens
        worst = max(worst, runner_shortfall(vlm, ref, got))
        tokens.append(got)
    report.measured["runner_tokens"] = tokens
    return same, worst


def _top1(runner, refs) -> tuple[float, int, float]:
    """(top-1 agreement along PyTorch's greedy tokens, steps, worst prefill logits error)."""
    hits = total = 0
    worst = 0.0
    for ref in refs:
        run = runner.generate(ref["inputs"], forced_tokens=ref["tokens"])
        hits += sum(int(a == b) for a, b in zip(run.argmax, ref["tokens"], strict=False))
        total += len(ref["tokens"])
        worst = max(worst, scaled_error(run.prefill_logits, ref["logits"])[0])
    return hits / max(total, 1), total, worst

