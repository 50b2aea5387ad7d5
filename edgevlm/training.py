"""A small, resumable training loop for VLMs on question/answer samples.

Used to train the `trained:` reference models and by recovery after pruning. Deterministic
for a given seed, machine and thread count: the samples of step k are a function of k only,
so a resumed run sees exactly the data an uninterrupted one would have seen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevlm.ui import progress

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 32
    grad_accum: int = 1
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100


def answer_loss(logits, batch):
    """Mean cross-entropy over the answer tokens of an `encode(..., with_answer=True)` batch
    (position t predicts token t+1, so the last prompt token predicts the first answer token)."""
    import torch.nn.functional as F

    mask = batch["answer_mask"][:, 1:]
    targets = batch["input_ids"][:, 1:][mask]
    return F.cross_entropy(logits[:, :-1][mask].float(), targets)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def fit(model, params, step_samples: Callable[[int, int], list], loss_fn: Callable,
        config: TrainConfig, checkpoint_dir: Path | None = None, *, resume: bool = False,
        show_progress: bool = True, desc: str = "train") -> list[float]:
    """Train `params` of `model` for `config.steps` optimizer steps; returns the loss per step.

    `step_samples(step, micro)` gives the samples of micro-batch `micro` of `step`;
    `loss_fn(samples)` returns a scalar loss tensor. With `checkpoint_dir`, a checkpoint
    (model, optimizer, step, losses) is written every `checkpoint_every` steps and at the
    end, atomically: an interrupted run leaves the last good one, which `resume` continues.
    """
    import torch

    torch.manual_seed(config.seed)
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    losses: list[float] = []
    start = 0
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume and path and path.exists():
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"]
    model.train()
    bar = progress(range(start, config.steps), desc=desc, total=config.steps - start,
                   enabled=show_progress)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.grad_accum):
            loss = loss_fn(step_samples(step, micro)) / config.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        scheduler.step()
        losses.append(total)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        done = step + 1
        if path and (done % config.checkpoint_every == 0 or done == config.steps):
            _save(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "step": done, "losses": losses,
                         "config": asdict(config)})
    model.eval()
    return losses


def _save(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint, even on Ctrl-C
