"""Next-token choice and incremental detokenisation shared by the runners (numpy only)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def sample_next(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
                rng: np.random.Generator | None = None) -> int:
    """Greedy at temperature 0, else nucleus sampling at `temperature` and `top_p`."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = (logits.astype(np.float64) - logits.max()) / temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # always keeps the top token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int((rng or np.random.default_rng()).choice(len(probs), p=probs))


class TextStream:
    """Turns tokens into text pieces as they come, holding back incomplete UTF-8.

    `detokenize(ids)` returns the bytes (or text) of those tokens; only the new token is
    detokenized each step, so streaming costs the same per token however long the answer.
    """

    def __init__(self, detokenize: Callable[[list[int]], bytes | str]):
        import codecs

        self.detokenize = detokenize
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def push(self, token: int) -> str:
        raw = self.detokenize([token])
        piece = self.decoder.decode(raw) if isinstance(raw, bytes) else raw
        self.text += piece
        return piece

    def flush(self) -> str:
        piece = self.decoder.decode(b"", final=True)
        self.text += piece
        return piece


def decode_loop(logits: np.ndarray, step: Callable[[int], np.ndarray],
                is_eos: Callable[[int], bool], stream, *, start: float, max_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                ignore_eos: bool = False, on_text: Callable[[str], None] | None = None):
    """Choose, stream and feed back tokens until EOS or max_tokens.

    `step(token)` runs the model on one token and returns the next logits; `stream` has
    push()/flush() (text pieces). Returns (tokens, times since `start`, stop reason)."""
    rng = np.random.default_rng(seed)
    tokens: list[int] = []
    times: list[float] = []
    stop = "max_tokens"
    for _ in range(max_tokens):
        token = sample_next(logits, temperature, top_p, rng)
        if not ignore_eos and is_eos(token):
            stop = "eos"
            break
        times.append(time.perf_counter() - start)
        tokens.append(token)
        piece = stream.push(token)
        if on_text and piece:
            on_text(piece)
        if len(tokens) < max_tokens:
            logits = step(token)
    rest = stream.flush()
    if on_text and rest:
        on_text(rest)
    return tokens, times, stop
