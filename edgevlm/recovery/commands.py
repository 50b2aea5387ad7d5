"""`edgevlm heal` and the recovery step of `edgevlm export --recover`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from edgevlm.errors import UsageError
from edgevlm.ui import info


def warn(message: str) -> None:
    """Shown even with -q: something the user should check, though not an error."""
    print(f"warning: {message}", file=sys.stderr)


def heal_config(args, recipe: str):
    """The HealConfig of `heal` / `export --recover` options; the device is checked here,
    before any model is loaded."""
    from edgevlm.recovery.heal import HealConfig
    from edgevlm.training import check_device

    check_device(getattr(args, "device", None))
    return HealConfig(recipe=recipe, data=args.data, fraction=args.fraction, train=args.train,
                      lora=args.lora, ce_weight=args.ce_weight, steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                      checkpoint_every=args.checkpoint_every)


def prepare(config, student_path: Path | None, teacher_name: str | None):
    """Everything checked before any model is loaded: options, data (answers present), the
    teacher/student pair. Returns the training data."""
    from edgevlm.recovery.data import training_data

    recipe, _, _ = config.resolved()
    if recipe.needs_teacher and not teacher_name:
        raise UsageError(f"--recipe {recipe.name} distils from a teacher",
                         "pass --teacher with the unpruned model, e.g. --teacher tiny:smolvlm")
    data = training_data(config.data, config.fraction, seed=config.seed,
                         need_answers=recipe.ce > 0, recipe=recipe.name)
    if student_path is not None and teacher_name:
        check_teacher(student_path, teacher_name, hidden_kd=bool(recipe.hidden_kd))
    return data


def check_teacher(student_path: Path, teacher_name: str, *, hidden_kd: bool) -> None:
    from transformers import AutoConfig

    from edgevlm.loader import resolve
    from edgevlm.recovery.heal import check_pair

    student_config = AutoConfig.from_pretrained(student_path)
    teacher_config = AutoConfig.from_pretrained(resolve(teacher_name))
    for message in check_pair(student_config, teacher_config, hidden_kd=hidden_kd,
                              teacher_name=teacher_name):
        warn(message)


def run(student, teacher, config, data, out: Path, *, checkpoint_dir: Path, resume: bool,
        provenance: dict) -> dict:
    """heal() with the user-facing handling of interruption: the checkpoint stays."""
    from edgevlm.recovery.heal import heal
    from edgevlm.ui import QUIET

    try:
        record = heal(student, teacher, config, data, out, checkpoint_dir=checkpoint_dir,
                      resume=resume, show_progress=not QUIET, provenance=provenance)
    except KeyboardInterrupt:
        warn(f"training interrupted: the last checkpoint is in {checkpoint_dir}; continue with "
             "the same command and --resume")
        raise
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return record


def _main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def cmd_heal(args) -> int:
    from edgevlm.commands import _load
    from edgevlm.loader import resolve
    from edgevlm.outdir import check_writable, staged_dir
    from edgevlm.recovery.heal import checkpoint_dir_for, heal

    out = Path(args.out)
    check_writable(out, args.force)
    checkpoint_dir = checkpoint_dir_for(out)
    if args.resume and not checkpoint_dir.exists():
        raise UsageError(f"--resume: no checkpoint at {checkpoint_dir}",
                         "run without --resume to start training")
    if checkpoint_dir.exists() and not (args.resume or args.force):
        raise UsageError(f"an interrupted run left a checkpoint at {checkpoint_dir}",
                         "pass --resume to continue it, or --force to start over")
    config = heal_config(args, args.recipe)
    student_path = resolve(args.pruned, seed=args.seed)
    data = prepare(config, student_path, args.teacher)
    student = _load(args, args.pruned)
    teacher = _load(args, args.teacher) if args.teacher else None
    if not _main_process():  # `accelerate launch`: only rank 0 writes the output
        heal(student, teacher, config, data, None, checkpoint_dir=checkpoint_dir,
             resume=args.resume, show_progress=False)
        return 0
    with staged_dir(out, args.force) as tmp:
        record = run(student, teacher, config, data, tmp, checkpoint_dir=checkpoint_dir,
                     resume=args.resume,
                     provenance={"student": args.pruned, "teacher": args.teacher})
    n_layers = student.adapter.num_layers(student.config)
    print(f"healed {args.pruned} -> {out} ({record['recipe']}, {record['steps']} steps, "
          f"{n_layers} decoder layers): loss {record['loss_first']:.4f} -> "
          f"{record['loss_last']:.4f} in {record['seconds']:.0f} s")
    return 0


def recover_for_export(args, model_dir: Path, tmp: Path) -> Path:
    """`export --recover R`: heal the just-pruned checkpoint with the base model as teacher;
    returns the healed checkpoint folder (inside the staged export folder) and its record."""
    from edgevlm.commands import _load

    config = heal_config(args, args.recover)
    data = prepare(config, model_dir, args.model)
    student = _load(args, str(model_dir))
    teacher = _load(args, args.model) if config.resolved()[0].needs_teacher else None
    healed = tmp / "healed"
    record = run(student, teacher, config, data, healed, checkpoint_dir=tmp / "heal.checkpoint",
                 resume=False, provenance={"student": "pruned", "teacher": args.model})
    info(f"recovered with {args.recover}: loss {record['loss_first']:.4f} -> "
         f"{record['loss_last']:.4f} in {record['steps']} steps")
    del student, teacher
    return healed, {k: v for k, v in record.items() if k != "losses"}
