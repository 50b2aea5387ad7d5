"""The shipped trained: reference models: they load like any checkpoint, keep the skills
their model cards report (a broken fixture fails here), and `eval` reports task accuracy."""

from __future__ import annotations

import json

import pytest

from edgevlm.accuracy import task_accuracy
from edgevlm.cli import main
from edgevlm.loader import load
from edgevlm.tasks import task_samples
from edgevlm.trained import RECIPES, folder

# Floors on a fixed 12-per-task slice of the test split, a little under what the models
# score there (smolvlm 0.698 average, qwen2-vl 0.521), for the tasks each model learned
# (model cards: the full 400-item test split, with chance levels).
FLOORS = {
    "smolvlm": {"average": 0.6, "colour": 0.9, "bigger": 0.9, "count": 0.6, "arith": 0.6},
    "qwen2-vl": {"average": 0.45, "colour": 0.9, "bigger": 0.9, "arith": 0.75},
}
_LOADED: dict = {}


def trained(family):
    if family not in _LOADED:
        _LOADED[family] = load(f"trained:{family}")
    return _LOADED[family]


@pytest.mark.parametrize("family", RECIPES.names())
def test_reference_model_is_a_standard_checkpoint(family):
    from transformers import AutoModelForImageTextToText

    path = folder(family)
    model = AutoModelForImageTextToText.from_pretrained(path)  # stock loading, no edgevlm
    assert model.config.get_text_config().num_hidden_layers >= 16
    card = (path / "README.md").read_text()
    record = json.loads((path / "training.json").read_text())
    assert f"{record['test_accuracy']['average']:.3f}" in card


@pytest.mark.parametrize("family", RECIPES.names())
def test_reference_model_keeps_its_skills(family):
    result = task_accuracy(trained(family), task_samples(96, "test"))
    for task, floor in FLOORS[family].items():
        value = result["average"] if task == "average" else result["per_task"][task]
        assert value >= floor, (task, result)


def test_eval_prints_accuracy_per_task_with_random_baseline(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["-q", "prune", "trained:smolvlm", "--method", "bi", "--n-layers", "3",
                 "--calib", "tasks:16", "-o", str(out)]) == 0
    report = tmp_path / "eval.json"
    assert main(["-q", "eval", "trained:smolvlm", str(out / "pruned"), "--calib", "tasks:32:test",
                 "--baseline", "random:2", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    for word in ("accuracy", "colour", "arith", "average", "random"):
        assert word in printed
    result = json.loads(report.read_text())
    base, pruned = result["accuracy"]["base"], result["accuracy"]["pruned"]
    assert base["n"] == pruned["n"] == 8  # the held-out quarter, never the scoring part
    assert set(result["random_baseline"]["accuracy_per_task"]) == set(base["per_task"])
