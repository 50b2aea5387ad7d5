"""Turning calibration samples into model inputs with each family's own chat template."""

from __future__ import annotations

from edgevlm.runtimes.families import user_turn
from edgevlm.runtimes.preprocess.prompt import template_wrote_bos


def chat_text(processor, prompt: str, answer: str | None = None) -> str:
    """The chat-formatted prompt for one image + text turn, optionally followed by an answer."""
    text = processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True, tokenize=False)
    return text + answer if answer else text


def chat_batch(processor, texts: list[str], images, **kwargs):
    """`processor(text=texts, images=images)` for rendered chats, tokenized as the processor's
    `apply_chat_template(tokenize=True)` does: no second BOS where the template wrote one
    (LLaVA, Gemma 3)."""
    wrote_bos = template_wrote_bos(texts[0], processor.tokenizer.bos_token)
    return processor(text=texts, images=images, add_special_tokens=not wrote_bos, **kwargs)


def encode(vlm, samples, *, with_answer: bool = False, answer_eos: bool = False, device=None):
    """Batch-encode samples (left-padded, so position -1 is every row's last prompt token).

    With `with_answer`, the reference answer follows the prompt and the returned batch has
    `answer_mask` (bool, batch x seq) marking the answer tokens. With `answer_eos` the answer
    ends with the tokenizer's end-of-turn token, masked as part of the answer: what training
    needs so that greedy generation stops after the answer.
    """
    import torch

    processor = vlm.processor
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token if answer_eos else ""
    answers = [(s.answer + eos) if with_answer and s.answer else None for s in samples]
    texts = [chat_text(processor, s.prompt, a) for s, a in zip(samples, answers, strict=True)]
    images = [[s.image] for s in samples]
    batch = chat_batch(processor, texts, images, return_tensors="pt", padding=True)
    if with_answer:
        lengths = [len(tokenizer(a or "", add_special_tokens=False).input_ids) for a in answers]
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for row, n in enumerate(lengths):
            if n:
                mask[row, -n:] = True
        batch["answer_mask"] = mask
    return batch.to(device or vlm.model.device)


def model_inputs(batch) -> dict:
    """The batch without edgevlm's own keys, ready for model(**inputs)."""
    return {k: v for k, v in batch.items() if k != "answer_mask"}
