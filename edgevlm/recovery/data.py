"""Training data for recovery: a calibration spec, its training split, a seeded share of it.

The training split is
  - for the procedural task set (`tasks`, `tasks:N`, `tasks:N:train`): the task set's train
    split, TASK_TRAIN_ITEMS items unless N says otherwise. Its val and test splits are what
    accuracy is measured on, so training on them is refused;
  - for every other spec (builtin, a folder, a .jsonl): the scoring part of the calibration
    split; its held-out part stays unseen for `eval`.
`--fraction f` keeps round(f * size) items of it (at least one), chosen with the seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import CalibrationError, UsageError

# The task set is procedural (unbounded); "a fraction of the training data" needs a size.
# 20,000 items: 5% is 1,000 items, enough to cover every task and answer many times.
TASK_TRAIN_ITEMS = 20_000


@dataclass
class TrainData:
    """A seeded selection of training items, generated on demand (`get(i)`, i < n)."""

    get: Callable[[int], object]
    n: int
    split_size: int
    description: dict

    def samples(self) -> list:
        return [self.get(i) for i in range(self.n)]


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise UsageError(f"--fraction {fraction} is outside (0, 1]",
                         "give the share of the training split to use, e.g. --fraction 0.05")


def _pick(size: int, fraction: float, seed: int) -> list[int]:
    n = max(1, round(fraction * size))
    return sorted(random.Random(seed).sample(range(size), n))


def training_data(spec: str, fraction: float, *, seed: int = 0, need_answers: bool = True,
                  recipe: str = "") -> TrainData:
    check_fraction(fraction)
    spec = str(spec)
    if spec == "tasks" or spec.startswith("tasks:"):
        return _tasks(spec, fraction, seed)
    from edgevlm.calib import load_calibration

    calib = load_calibration(spec, seed=seed)
    split = calib.scoring
    if need_answers:  # every item, held-out ones too: a file is either usable or fixed
        check_answers(spec, split + calib.heldout, recipe)
    chosen = [split[i] for i in _pick(len(split), fraction, seed)]
    return TrainData(get=chosen.__getitem__, n=len(chosen), split_size=len(split),
                     description={"spec": spec, "fraction": fraction, "items": len(chosen),
                                  "split": "calibration scoring part", "split_size": len(split),
                                  "fingerprint": calib.description["fingerprint"]})


def _tasks(spec: str, fraction: float, seed: int) -> TrainData:
    from edgevlm.tasks import task_sample

    parts = spec.split(":")[1:]
    count = parts[0] if parts else str(TASK_TRAIN_ITEMS)
    split = parts[1] if len(parts) > 1 else "train"
    if len(parts) > 2 or not count.isdigit() or int(count) < 1:
        raise CalibrationError(f"bad task spec '{spec}'", "use tasks, tasks:N or tasks:N:train")
    if split != "train":
        raise UsageError(f"'{spec}' would train on the task set's {split} split, which accuracy "
                         "is measured on", f"train on the train split: --data tasks:{count}:train")
    indices = _pick(int(count), fraction, seed)
    # Items depend on the task-set seed 0, like the reference models' training data: the
    # selection seed only chooses which items.
    return TrainData(get=lambda i: task_sample(indices[i], "train", 0), n=len(indices),
                     split_size=int(count),
                     description={"spec": spec, "fraction": fraction, "items": len(indices),
                                  "split": "tasks train", "split_size": int(count)})


def check_answers(spec: str, samples, recipe: str) -> None:
    """Refuse items without a reference answer, naming the file and line it came from."""
    missing = [s for s in samples if not s.answer]
    if not missing:
        return
    where = _where(spec, missing[0])
    raise CalibrationError(
        f"{where}: item has no answer, and --recipe {recipe} trains on answers "
        f"({len(missing)} of {len(samples)} training items lack one)",
        "add an \"answer\" to every item, or use --recipe logit-kd --ce-weight 0, "
        "which needs none")


def _where(spec: str, sample) -> str:
    """'file.jsonl:LINE' for a .jsonl item; 'prompts.jsonl:LINE' or the image file for a folder."""
    from edgevlm.calib import PROMPTS_FILE, _read_jsonl

    path = Path(spec).expanduser()
    image = Path(sample.source)
    if path.is_file():
        for no, rec in _read_jsonl(path):
            if (path.parent / rec["image"]) == image and rec["prompt"] == sample.prompt \
                    and not rec.get("answer"):
                return f"{path}:{no}"
        return str(path)
    if path.is_dir():
        prompts = path / PROMPTS_FILE
        if prompts.is_file():
            for no, rec in _read_jsonl(prompts):
                if rec["image"] == image.name and rec["prompt"] == sample.prompt \
                        and not rec.get("answer"):
                    return f"{prompts}:{no}"
        return f"{image} (no answer in {PROMPTS_FILE})"
    return sample.source
