"""heal(): train a pruned model back toward its unpruned teacher and save a stock checkpoint.

What trains is the recipe's choice (projector) or --train (decoder, projector, all), either
fully or through LoRA adapters on the decoder's linear layers that are merged into the
weights on save, so the output has the student's exact architecture and loads, evaluates
and exports like any pruned checkpoint. Training checkpoints go to a sibling folder
(`<out>.checkpoint`), written atomically every N steps: Ctrl-C leaves the last good one,
and --resume continues from it with the same data order.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevlm.errors import UsageError
from edgevlm.recovery.losses import recipe_with
from edgevlm.ui import info

RECOVERY_CONFIG_KEY = "edgevlm_recovery"
TRAIN_PARTS = ("decoder", "projector", "all")
# The decoder's linear layers that LoRA adapts (every supported family names them so).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = {"full": 2e-4, "lora": 1e-3, "projector": 1e-3}


@dataclass
class HealConfig:
    recipe: str
    data: str
    fraction: float = 0.05
    train: str | None = None  # default: the recipe's
    lora: int | None = None  # LoRA rank; None: full fine-tuning
    ce_weight: float | None = None  # logit-kd only
    steps: int | None = None  # default: one pass over the selected items
    lr: float | None = None  # default: DEFAULT_LR by what trains
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 50

    def resolved(self):
        """(recipe, what trains, learning rate), with the option combinations checked."""
        recipe = recipe_with(self.recipe, self.ce_weight)
        train = self.train or recipe.train
        if train not in TRAIN_PARTS:
            raise UsageError(f"--train {train} is not one of {', '.join(TRAIN_PARTS)}",
                             "e.g. --train decoder")
        if recipe.fixed_train and train != recipe.train:
            raise UsageError(f"--recipe {recipe.name} trains the {recipe.train} only",
                             f"drop --train {train}, or use --recipe sft --train {train}")
        if self.lora is not None:
            if self.lora < 1:
                raise UsageError(f"--lora {self.lora} must be a positive rank", "e.g. --lora 8")
            if train == "projector":
                raise UsageError("--lora adapts the decoder's linear layers; the projector "
                                 "recipe trains the projector only", "drop --lora, or use --recipe sft")
        for name in ("batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {getattr(self, name)} must be at least 1", f"use {flag} 1 or more")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps {self.steps} must be at least 1", "use --steps 1 or more")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr {self.lr} must be positive", "e.g. --lr 2e-4")
        kind = "projector" if train == "projector" else ("lora" if self.lora else "full")
        return recipe, train, self.lr or DEFAULT_LR[kind]


def checkpoint_dir_for(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


# ------------------------------------------------------------------------ compatibility
def check_pair(student_config, teacher_config, *, hidden_kd: bool, teacher_name: str) -> list[str]:
    """Refuse a teacher the student cannot learn from; return warnings for a teacher that
    is not the student's unpruned ancestor (allowed: distilling from another model)."""
    from edgevlm.adapters import adapter_for_config

    s_family = adapter_for_config(student_config).family
    t_family = adapter_for_config(teacher_config).family
    if s_family != t_family:
        raise UsageError(f"teacher {teacher_name} is a {t_family} model, the student a {s_family}",
                         "use the unpruned model the student was pruned from as --teacher")
    s_text, t_text = student_config.get_text_config(), teacher_config.get_text_config()
    if s_text.vocab_size != t_text.vocab_size:
        raise UsageError(f"teacher vocabulary ({t_text.vocab_size}) differs from the student's "
                         f"({s_text.vocab_size}): their logits cannot be compared",
                         "use the unpruned model the student was pruned from as --teacher")
    if hidden_kd and s_text.hidden_size != t_text.hidden_size:
        raise UsageError(f"hidden-state distillation needs equal hidden sizes (teacher "
                         f"{t_text.hidden_size}, student {s_text.hidden_size})",
                         "use --recipe logit-kd or sft")
    plan = getattr(student_config, "edgevlm_plan", None) or {}
    t_layers = int(t_text.num_hidden_layers)
    original = plan.get("n_layers")
    if not plan:
        return [f"the student has no pruning plan in its config.json: is it pruned from "
                f"{teacher_name}?"]
    if original is not None and int(original) != t_layers:
        return [f"the student was pruned from a {original}-layer model, the teacher "
                f"{teacher_name} has {t_layers} layers: is it the right teacher?"]
    return []


# ---------------------------------------------------------------------------- trainables
def trainable_parameters(vlm, train: str, lora: int | None, seed: int):
    """Freeze everything, then enable what trains (wrapping decoder linears with LoRA when
    asked). Returns (parameters, peft model or None)."""
    import re

    import torch

    model = vlm.model
    model.requires_grad_(False)
    if lora:
        from edgevlm.errors import require

        peft = require("peft", "prune", "LoRA recovery (--lora)")
        prefix = re.escape(vlm.adapter.text_model)
        targets = rf"{prefix}\.layers\.\d+\..*\.({'|'.join(LORA_TARGETS)})$"
        torch.manual_seed(seed)  # LoRA's A matrices are random
        config = peft.LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0,
                                 target_modules=targets)
        wrapped = peft.get_peft_model(model, config)  # injects adapters into `model` in place
        if train == "all":
            model.requires_grad_(True)
            for name, p in model.named_parameters():
                if "base_layer" in name:
                    p.requires_grad_(False)
        return [p for p in model.parameters() if p.requires_grad], wrapped
    if train == "projector":
        parts = [vlm.adapter.projector_module(model)]
    elif train == "decoder":
        parts = [vlm.adapter.text_stack(model)]
    else:
        parts = [model]
    for part in parts:
        part.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad], None


# ---------------------------------------------------------------------------------- heal
def heal(student, teacher, config: HealConfig, data, out_dir: Path, *,
         checkpoint_dir: Path | None = None, resume: bool = False,
         show_progress: bool = True, provenance: dict | None = None) -> dict:
    """Train `student` (a LoadedVLM, modified in place) on `data` (recovery.data.TrainData)
    with `config`'s recipe and save it to `out_dir` as a stock checkpoint; return the record
    also stored in its config.json under `edgevlm_recovery`."""
    import torch

    from edgevlm.recovery.losses import make_loss
    from edgevlm.training import TrainConfig, accelerator_for, fit

    recipe, train, lr = config.resolved()
    if recipe.needs_teacher and teacher is None:
        raise UsageError(f"--recipe {recipe.name} distils from a teacher", "pass --teacher BASE")
    # The student's device (--device) through accelerate; under `accelerate launch` each
    # process trains on its own GPU and takes its own micro-batches of every step.
    accelerator = accelerator_for(None if _launched() else student.model.device.type)
    student.model.to(accelerator.device)
    if teacher is not None:
        teacher.model.to(accelerator.device)
    world = accelerator.num_processes
    per_step = config.batch_size * config.grad_accum * world
    steps = config.steps or max(1, math.ceil(data.n / per_step))
    stored_dtype = next(iter(student.model.parameters())).dtype
    saved_dtype = _checkpoint_dtype(student.path) or stored_dtype
    params, wrapped = trainable_parameters(student, train, config.lora, config.seed)
    n_trainable = sum(p.numel() for p in params)
    if teacher is not None:
        teacher.model.requires_grad_(False).eval()
    train_config = TrainConfig(steps=steps, lr=lr, batch_size=config.batch_size,
                               grad_accum=config.grad_accum, warmup=min(50, steps // 10),
                               seed=config.seed, checkpoint_every=config.checkpoint_every)
    if checkpoint_dir is not None and (resume or accelerator.is_main_process):
        _check_resume(checkpoint_dir, config, resume)

    def step_samples(step: int, micro: int) -> list:
        # Epoch e visits the items in a seeded permutation of its own: a function of the
        # step only, so a resumed run sees what an uninterrupted one would have.
        first = (step * config.grad_accum * world + micro) * config.batch_size
        return [data.get(_order(data.n, (first + j) // data.n, config.seed)[(first + j) % data.n])
                for j in range(config.batch_size)]

    loss_fn, parts, close = make_loss(recipe, student, teacher)
    info(f"heal: recipe {recipe.name}, training {train}"
         f"{f' through LoRA r={config.lora}' if config.lora else ''} ({n_trainable / 1e6:.2f} M "
         f"parameters), {data.n} items, {steps} steps of {per_step}, lr {lr:g}")
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    started = time.time()
    try:
        losses = fit(student.model, params, step_samples, loss_fn, train_config, checkpoint_dir,
                     resume=resume, show_progress=show_progress, desc=f"heal {recipe.name}",
                     accelerator=accelerator)
    finally:
        close()
    seconds = time.time() - started
    if wrapped is not None:
        student.model = wrapped.merge_and_unload()
    student.model.requires_grad_(False).eval()
    record = {
        "recipe": recipe.name, "train": train, "lora": config.lora, "ce_weight": recipe.ce,
        "hidden_kd_weight": recipe.hidden_kd, "logit_kd_weight": recipe.logit_kd,
        "data": data.description, "steps": steps, "lr": lr, "batch_size": config.batch_size,
        "grad_accum": config.grad_accum, "seed": config.seed,
        "trainable_parameters": n_trainable, "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "last_terms": dict(parts), "seconds": round(seconds, 1),
        "device": str(accelerator.device), "processes": world,
        "peak_gpu_memory_mb": (torch.cuda.max_memory_allocated(accelerator.device) / 1e6
                               if on_gpu else None),
        **(provenance or {}),
    }
    if out_dir is not None and accelerator.is_main_process:
        save_healed(student, out_dir, record, saved_dtype)
    accelerator.wait_for_everyone()
    record["losses"] = losses
    return record


def _launched() -> bool:
    """Started by `accelerate launch` (or torchrun) with more than one process."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@functools.lru_cache(maxsize=4)
def _order(n: int, epoch: int, seed: int) -> list[int]:
    import random

    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _check_resume(checkpoint_dir: Path, config: HealConfig, resume: bool) -> None:
    """A checkpoint continues only the run it came from: same recipe, data and schedule."""
    from edgevlm.training import CHECKPOINT

    meta = Path(checkpoint_dir) / "heal.json"
    mine = asdict(config)
    if resume:
        if not (Path(checkpoint_dir) / CHECKPOINT).exists():
            raise UsageError(f"--resume: no checkpoint in {checkpoint_dir}",
                             "run without --resume to start training")
        theirs = json.loads(meta.read_text()) if meta.exists() else {}
        changed = sorted(k for k in mine if k != "checkpoint_every" and theirs.get(k) != mine[k])
        if changed:
            raise UsageError(f"--resume: the checkpoint in {checkpoint_dir} is of a run with "
                             f"other {', '.join(changed)}",
                             "resume with the same options, or start over with --force")
        return
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    (Path(checkpoint_dir) / CHECKPOINT).unlink(missing_ok=True)
    meta.write_text(json.dumps(mine, indent=1) + "\n")


def _checkpoint_dtype(path: Path):
    """The dtype the student's checkpoint stores (so healing does not double its size)."""
    import torch

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def save_healed(vlm, out_dir: Path, record: dict, dtype) -> Path:
    """save_pretrained (weights in `dtype`) + processor; the plan stays in config.json and the
    recovery record joins it."""
    from edgevlm.prune import save_pruned

    setattr(vlm.model.config, RECOVERY_CONFIG_KEY, record)
    vlm.model.to(dtype)
    return save_pruned(vlm, out_dir)
