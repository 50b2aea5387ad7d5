"""A small, resumable training loop for VLMs on question/answer samples.

Used to train the `trained:` reference models and by recovery after pruning. Deterministic
for a given seed, machine and thread count: the samples of step k are a function of k only,
so a resumed run sees exactly the data an uninterrupted one would have seen.

Device placement, backward and (under `accelerate launch` with several processes) the
averaging of gradients across processes go through accelerate's Accelerator, which runs on
CPU too. With N processes each one computes its own micro-batches of a step (micro-batch
numbers `micro * N + rank`), their gradients are averaged before the update, so every process
keeps identical weights without wrapping the model; only the main process writes checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevlm.errors import UsageError
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


def check_device(device: str | None) -> None:
    """Refuse, before anything is loaded, a --device torch cannot use here."""
    import torch

    kind = None if device is None else str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU here",
                         "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple's Metal (MPS) backend is not available here",
                         "use --device cpu (MPS needs Apple Silicon and macOS 12.3+)")


def accelerator_for(device: str | None = None):
    """accelerate's Accelerator for `device` ("cpu", "cuda", "mps"; None: accelerate's choice,
    under `accelerate launch` this process's GPU). Refuses a device torch cannot see."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    kind = None if device is None else str(device).split(":")[0]
    if PartialState._shared_state and kind is not None:
        # One state per process; a caller asking for another device (tests, a library user
        # training on CPU then GPU) gets a fresh one.
        if PartialState().device.type != kind:
            AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=kind == "cpu")
    if kind is not None and accelerator.device.type != kind:
        raise UsageError(f"--device {kind}: no {kind} device is available to torch here "
                         f"(accelerate would use {accelerator.device.type})",
                         "use --device cpu, or install a torch build for that device")
    return accelerator


def fit(model, params, step_samples: Callable[[int, int], list], loss_fn: Callable,
        config: TrainConfig, checkpoint_dir: Path | None = None, *, resume: bool = False,
        show_progress: bool = True, desc: str = "train", accelerator=None) -> list[float]:
    """Train `params` of `model` for `config.steps` optimizer steps; returns the loss per step.

    `step_samples(step, micro)` gives the samples of micro-batch `micro` of `step`, micro in
    range(grad_accum * processes) (process `rank` takes `micro * processes + rank`);
    `loss_fn(samples)` returns a scalar loss tensor. `accelerator` (default: one for the
    model's device) places the model and runs backward. With `checkpoint_dir`, a checkpoint
    (model, optimizer, step, losses) is written every `checkpoint_every` steps and at the
    end, atomically: an interrupted run leaves the last good one, which `resume` continues.
    """
    import torch

    if accelerator is None:
        accelerator = accelerator_for(next(iter(model.parameters())).device.type)
    world, rank = accelerator.num_processes, accelerator.process_index
    model.to(accelerator.device)
    torch.manual_seed(config.seed)
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    losses: list[float] = []
    start = 0
    path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if resume and path and path.exists():
        state = torch.load(path, weights_only=False, map_location=accelerator.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"]
    model.train()
    bar = progress(range(start, config.steps), desc=desc, total=config.steps - start,
                   enabled=show_progress and accelerator.is_main_process)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            loss = loss_fn(step_samples(step, micro * world + rank)) / config.grad_accum
            accelerator.backward(loss)
            total += loss.detach()
        if world > 1:  # data parallel: every process applies the mean gradient
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            total = accelerator.reduce(total, reduction="mean")
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        scheduler.step()
        losses.append(total.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        done = step + 1
        if path and (done % config.checkpoint_every == 0 or done == config.steps):
            if accelerator.is_main_process:
                _save(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "step": done,
                             "losses": losses, "config": asdict(config)})
            accelerator.wait_for_everyone()
    model.eval()
    return losses


def _save(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint, even on Ctrl-C
