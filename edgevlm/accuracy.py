"""Task accuracy: exact match of a model's greedy answers with the reference answers.

This is how the papers judge pruning (accuracy against pruning ratio), and what KL and
perplexity cannot tell: whether the model still answers right.
"""

from __future__ import annotations

import re
import statistics

from edgevlm.ui import progress

_TRAILING = re.compile(r"[\s.!?,;:]+$")


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace, no trailing punctuation:
    'Red.' and ' red' are the same answer; 'red circle' is not 'red'."""
    return _TRAILING.sub("", " ".join(text.lower().split()))


def is_correct(prediction: str, reference: str) -> bool:
    """Exact match after `normalize_answer`: extra words make an answer wrong."""
    return normalize_answer(prediction) == normalize_answer(reference)


def score_answers(predictions: list[str], samples) -> dict:
    """Per-task and average accuracy of `predictions` for `samples` (with answers).

    `average` is the mean of the per-task accuracies (each task weighs the same, like a
    benchmark average); `micro` is the share of all items answered right.
    """
    by_task: dict[str, list[bool]] = {}
    for prediction, sample in zip(predictions, samples, strict=True):
        by_task.setdefault(sample.task or "other", []).append(is_correct(prediction, sample.answer))
    per_task = {task: sum(ok) / len(ok) for task, ok in sorted(by_task.items())}
    hits = [ok for oks in by_task.values() for ok in oks]
    return {
        "average": statistics.fmean(per_task.values()) if per_task else None,
        "micro": sum(hits) / len(hits) if hits else None,
        "per_task": per_task,
        "n": len(hits),
    }


def greedy_answers(vlm, samples, *, max_new_tokens: int = 8, batch_size: int = 16,
                   show_progress: bool = False) -> list[str]:
    """The model's greedy answer to each sample's prompt and image, decoded without special
    tokens and stopped at end of turn."""
    import torch

    from edgevlm.prompting import encode, model_inputs

    tokenizer = vlm.processor.tokenizer
    answers = []
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch_samples in progress(batches, desc="answers", enabled=show_progress):
        batch = encode(vlm, batch_samples)
        prompt_len = batch["input_ids"].shape[1]
        with torch.no_grad():
            out = vlm.model.generate(**model_inputs(batch), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return answers


def task_accuracy(vlm, samples, **kwargs) -> dict:
    """Greedy answers of `vlm` on the samples that carry answers, scored per task."""
    samples = [s for s in samples if s.answer]
    if not samples:
        return {"average": None, "micro": None, "per_task": {}, "n": 0}
    return score_answers(greedy_answers(vlm, samples, **kwargs), samples)
