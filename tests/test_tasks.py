"""The task set (answers true to the pictures, disjoint splits) and exact-match accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.accuracy import is_correct, normalize_answer, score_answers
from edgevlm.calib import CalibSample, load_calibration
from edgevlm.errors import CalibrationError
from edgevlm.tasks import COLOURS, SHAPES, TASKS, parse_spec, task_sample, task_samples


def _item(task, answer):
    return CalibSample(image=None, prompt="q", answer=answer, source="x", task=task)


@pytest.mark.parametrize("prediction, reference, right", [
    ("red", "red", True),
    (" Red.", "red", True),  # case, surrounding space and a final full stop do not count
    ("red\n", "Red", True),
    ("blue", "red", False),
    ("red circle", "red", False),  # extra tokens make an answer wrong
    ("red red", "red", False),
    ("", "red", False),
    ("k42", "k42", True),
    ("k4", "k42", False),
])
def test_exact_match(prediction, reference, right):
    assert is_correct(prediction, reference) is right


def test_normalize_keeps_inner_punctuation():
    assert normalize_answer("  Three  plus\tfour. ") == "three plus four"
    assert normalize_answer("3.5") == "3.5"


def test_score_answers_per_task_and_average_by_hand():
    samples = [_item("colour", "red"), _item("colour", "blue"), _item("colour", "green"),
               _item("count", "3")]
    predictions = ["Red.", "blue circle", "green", "3"]
    result = score_answers(predictions, samples)
    assert result["per_task"] == {"colour": pytest.approx(2 / 3), "count": 1.0}
    assert result["average"] == pytest.approx((2 / 3 + 1.0) / 2)  # tasks weigh the same
    assert result["micro"] == pytest.approx(3 / 4)
    assert result["n"] == 4


def test_items_are_deterministic_and_splits_disjoint():
    a, b = task_sample(5, "train"), task_sample(5, "train")
    assert a.image.tobytes() == b.image.tobytes() and (a.prompt, a.answer) == (b.prompt, b.answer)
    train = {task_sample(i, "train").image.tobytes() for i in range(40)}
    test = {task_sample(i, "test").image.tobytes() for i in range(40)}
    # Blank arithmetic canvases of the same size may coincide; pictured items never should.
    assert len(train & test) <= 2
    assert task_samples(8, "test")[3].image.tobytes() == task_samples(40, "test")[3].image.tobytes()


def test_every_task_is_covered_with_varied_sizes():
    items = task_samples(80, "val")
    assert {s.task for s in items} == set(TASKS)
    sizes = {s.image.size for s in items}
    assert len(sizes) > 40 and len({w > h for w, h in sizes}) == 2  # landscape and portrait


def _colour_mask(image, colour):
    return np.all(np.asarray(image, dtype=int) == COLOURS[colour], axis=-1)


def test_answers_are_true_to_the_picture():
    checked = {"colour": 0, "position": 0, "bigger": 0}
    for item in task_samples(240, "test"):
        if item.task == "colour":
            areas = {c: _colour_mask(item.image, c).sum() for c in COLOURS}
            assert max(areas, key=areas.get) == item.answer
        elif item.task == "position":
            words = item.prompt.split()
            a, b = words[3], words[-2]
            ya, xa = np.argwhere(_colour_mask(item.image, a)).mean(0)
            yb, xb = np.argwhere(_colour_mask(item.image, b)).mean(0)
            truth = {"left": xa < xb, "right": xa > xb, "above": ya < yb, "below": ya > yb}
            assert truth[item.answer], item.prompt
        elif item.task == "bigger":
            words = item.prompt.replace(",", "").split()
            a, b = words[5], words[9]
            big = max((a, b), key=lambda c: _colour_mask(item.image, c).sum())
            assert big == item.answer
        else:
            continue
        checked[item.task] += 1
    assert min(checked.values()) >= 20


def test_answer_vocabularies():
    for item in task_samples(160, "val"):
        allowed = {"colour": set(COLOURS), "shape": set(SHAPES),
                   "count": {str(n) for n in range(1, 7)},
                   "position": {"left", "right", "above", "below"}, "bigger": set(COLOURS),
                   "yesno": {"yes", "no"}, "arith": {str(n) for n in range(19)}}.get(item.task)
        if allowed is not None:
            assert item.answer in allowed, (item.task, item.answer)
        else:
            assert item.task == "read" and 1 <= len(item.answer) <= 3


def test_task_specs():
    assert parse_spec("tasks") == (200, "val")
    assert parse_spec("tasks:40") == (40, "val")
    assert parse_spec("tasks:40:test") == (40, "test")
    calib = load_calibration("tasks:16:test", seed=0)
    assert len(calib.scoring) + len(calib.heldout) == 16
    assert all(s.source.startswith("tasks:test:") and s.task for s in calib.scoring)
    for bad in ("tasks:0", "tasks:x", "tasks:10:dev", "tasks:1:test:more"):
        with pytest.raises(CalibrationError, match="task spec|split"):
            load_calibration(bad)
