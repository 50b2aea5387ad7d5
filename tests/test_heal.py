"""Issue 10: `edgevlm heal` (recipes, LoRA merge, resume, data selection, bad input) on tiny
models, and the healed checkpoint exported and verified in both targets."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import FAMILIES, load_tiny, pruned_checkpoint

from edgevlm.cli import main
from edgevlm.errors import CalibrationError, UsageError
from edgevlm.loader import LoadedVLM, load
from edgevlm.recovery.data import TASK_TRAIN_ITEMS, training_data
from edgevlm.recovery.heal import HealConfig, check_pair, heal
from edgevlm.training import CHECKPOINT

# Two layers each family can lose (Gemma 3 keeps its 5 local : 1 global pattern only by
# losing layers from the end of its 12).
DROP = {"gemma3": (10, 11)}


def _student(family, tmp_path, drop=None):
    drop = drop or DROP.get(family, (1, 2))
    return load(str(pruned_checkpoint(family, list(drop), tmp_path / f"{family}-pruned")))


def _teacher(family):
    base = load_tiny(family)
    return LoadedVLM(model=copy.deepcopy(base.model), processor=base.processor,
                     adapter=base.adapter, name=base.name, path=base.path)


# ------------------------------------------------------------------------------- data
def test_fraction_is_a_seeded_share_of_the_train_split():
    data = training_data("tasks", 0.001, seed=0)
    assert data.split_size == TASK_TRAIN_ITEMS and data.n == round(0.001 * TASK_TRAIN_ITEMS)
    again, other = training_data("tasks", 0.001, seed=0), training_data("tasks", 0.001, seed=1)
    assert [s.source for s in data.samples()] == [s.source for s in again.samples()]
    assert [s.source for s in data.samples()] != [s.source for s in other.samples()]
    assert all(s.source.startswith("tasks:train:") for s in data.samples())
    small = training_data("builtin:16", 0.5, seed=0)
    assert small.split_size == 12 and small.n == 6  # the scoring part of 16 (4 held out)
    assert training_data("tasks:50:train", 1.0).n == 50


@pytest.mark.parametrize("spec, fraction, match", [
    ("tasks", 0.0, "outside"), ("tasks", 1.5, "outside"), ("tasks", -0.1, "outside"),
    ("tasks:100:test", 0.5, "accuracy is measured on"), ("tasks:x", 0.5, "bad task spec"),
])
def test_bad_data_specs(spec, fraction, match):
    with pytest.raises(UsageError, match=match):
        training_data(spec, fraction)


def _jsonl(tmp_path, answers):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "prompt": f"q{i}?", **({"answer": a} if a else {})})
             for i, a in enumerate(answers)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_items_without_answers_are_refused_naming_file_and_line(tmp_path):
    path = _jsonl(tmp_path, ["red", "red", None, "red", "red", "red", "red", "red"])
    with pytest.raises(CalibrationError, match=rf"{path}:3: item has no answer"):
        training_data(str(path), 1.0, need_answers=True, recipe="sft")
    assert training_data(str(path), 1.0, need_answers=False).n >= 1  # logit-kd needs none


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_for_every_family(family, tmp_path):
    """sft+hidden-kd on four items, seen again and again, against the same run with a learning
    rate too small to move anything: training must bring the loss clearly below the control's
    (here tiny:qwen2-vl 3.18 -> 2.83, the slowest family, against a flat 3.18; the control
    moves by less than 1e-6), lower its terms (Gemma 3's hidden-state term rises here: 0.18 ->
    0.52 while its CE falls), and change
    every trained decoder weight while the frozen vision tower stays put. Fails when the
    learning rate does not reach the optimizer, when gradients do not reach the trained
    modules, or when a loss term is detached."""
    data = training_data("tasks", 4 / TASK_TRAIN_ITEMS, seed=0)

    def run(lr, name):
        student = _student(family, tmp_path / name)
        before = {k: v.clone() for k, v in student.model.state_dict().items()}
        config = HealConfig("sft+hidden-kd", "tasks", fraction=4 / TASK_TRAIN_ITEMS, steps=8,
                            batch_size=4, lr=lr)
        record = heal(student, _teacher(family), config, data, tmp_path / name / "healed",
                      show_progress=False)
        after = load(str(tmp_path / name / "healed")).model.state_dict()
        return record, before, after

    trained, before, after = run(3e-3, "trained")
    control, _, _ = run(1e-12, "control")
    losses, flat = trained["losses"], control["losses"]
    assert len(losses) == 8 and losses[0] == pytest.approx(flat[0], rel=1e-4)  # same start
    assert max(flat) - min(flat) < 1e-3 * flat[0], flat  # the control does not learn
    assert losses[-1] < 0.93 * flat[-1], (losses, flat)
    assert trained["last_terms"].keys() == {"ce", "hidden_mse"}
    assert trained["last_terms"]["ce"] < control["last_terms"]["ce"]
    if family != "gemma3":  # its CE term pulls the final hidden states away at this lr
        assert trained["last_terms"]["hidden_mse"] < 0.8 * control["last_terms"]["hidden_mse"]
    student = load_tiny(family)
    text = student.adapter.text_model.removeprefix("model.")
    vision = student.adapter.vision_tower.removeprefix("model.")
    layer_weights = [k for k in after if f"{text}.layers." in k and k.endswith("proj.weight")]
    assert layer_weights and all(not torch.equal(before[k], after[k]) for k in layer_weights)
    vision_weights = [k for k in after if vision in k]
    assert vision_weights and all(torch.equal(before[k], after[k]) for k in vision_weights)


@pytest.mark.parametrize("family", ["qwen2-vl", "smolvlm"])
def test_distillation_terms_match_a_hand_computation(family, tmp_path):
    """The first step's hidden-state MSE and logit KL equal what the models' own outputs give:
    the final hidden states (after the final norm: lm_head(h) reproduces the logits) of
    student and teacher on the same real tokens, padding excluded; and distilling the teacher
    into an exact copy of itself starts at exactly zero."""
    import torch.nn.functional as F

    from edgevlm.prompting import encode, model_inputs

    data = training_data("tasks", 4 / TASK_TRAIN_ITEMS, seed=0)
    student, teacher = _student(family, tmp_path), _teacher(family)
    batch = encode(student, data.samples(), with_answer=True, answer_eos=True)
    inputs, real = model_inputs(batch), batch["attention_mask"].bool()
    with torch.no_grad():
        s_out = student.model(**inputs, output_hidden_states=True)
        t_out = teacher.model(**inputs, output_hidden_states=True)
    lm_head = student.adapter.lm_head_module(student.model)
    assert torch.allclose(lm_head(s_out.hidden_states[-1]), s_out.logits, atol=1e-5)
    mse = F.mse_loss(s_out.hidden_states[-1][real], t_out.hidden_states[-1][real]).item()
    log_s = F.log_softmax(s_out.logits[real] / 2, -1)
    log_t = F.log_softmax(t_out.logits[real] / 2, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item() * 4
    assert mse > 1e-4 and kl > 1e-4  # two layers removed: the student differs
    for recipe, term, want in [("sft+hidden-kd", "hidden_mse", mse), ("logit-kd", "kl", kl)]:
        config = HealConfig(recipe, "tasks", steps=1, batch_size=4, lr=1e-12)
        record = heal(_student(family, tmp_path / recipe), _teacher(family), config, data,
                      tmp_path / recipe / "healed", show_progress=False)
        assert record["last_terms"][term] == pytest.approx(want, rel=1e-4), (term, want)
        itself = heal(_teacher(family), _teacher(family), config, data,
                      tmp_path / recipe / "itself", show_progress=False)
        assert itself["last_terms"][term] == pytest.approx(0, abs=1e-9)


def test_lora_merges_into_a_stock_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText

    family = "qwen2-vl"
    pruned_dir = pruned_checkpoint(family, [1, 2], tmp_path / "pruned")
    student, teacher = load(str(pruned_dir)), _teacher(family)
    data = training_data("tasks", 8 / TASK_TRAIN_ITEMS)
    config = HealConfig("logit-kd", "tasks", lora=4, steps=3, batch_size=4, lr=1e-2)
    heal(student, teacher, config, data, tmp_path / "healed", show_progress=False)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "healed" / "model.safetensors")
    original = load_file(pruned_dir / "model.safetensors")
    # Merged: exactly the pruned checkpoint's tensors and shapes, no adapter or base_layer keys
    # (from_pretrained would silently drop those and random-initialise the missing weights).
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    healed, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "healed",
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    before = AutoModelForImageTextToText.from_pretrained(pruned_dir)
    assert healed.config.get_text_config().num_hidden_layers == 6
    got, want = healed.state_dict(), before.state_dict()
    changed = [k for k in got if not torch.equal(got[k], want[k])]
    assert changed and all(k.endswith(("proj.weight",)) for k in changed), changed
    assert healed.config.edgevlm_recovery["lora"] == 4
    assert healed.config.edgevlm_plan["layers"] == [1, 2]  # the plan is kept


def test_projector_recipe_trains_only_the_projector(tmp_path):
    family = "smolvlm"
    student = _student(family, tmp_path)
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    data = training_data("tasks", 4 / TASK_TRAIN_ITEMS)
    heal(student, None, HealConfig("projector", "tasks", steps=2, batch_size=4, lr=1e-2), data,
         tmp_path / "healed", show_progress=False)
    after = load(str(tmp_path / "healed")).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projector = student.adapter.projector.removeprefix("model.")
    assert changed and all(projector in k for k in changed), changed


def test_resume_continues_from_the_saved_step(tmp_path):
    """Interrupt at step 3 of 4 (checkpoint every 2): resuming redoes only steps 3-4, and
    ends where an uninterrupted run ends."""
    family = "smolvlm"
    data = training_data("tasks", 16 / TASK_TRAIN_ITEMS)
    config = HealConfig("sft", "tasks", steps=4, batch_size=4, lr=1e-3, checkpoint_every=2)
    full = heal(_student(family, tmp_path / "a"), None, config, data, tmp_path / "full",
                checkpoint_dir=tmp_path / "ckpt-full", show_progress=False)

    calls = {"n": 0}

    class Interrupting:
        n = data.n

        def get(self, i):
            calls["n"] += 1
            if calls["n"] > 2 * config.batch_size:  # during step 3
                raise KeyboardInterrupt
            return data.get(i)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        heal(_student(family, tmp_path / "b"), None, config, Interrupting(), tmp_path / "out",
             checkpoint_dir=ckpt, show_progress=False)
    assert not (tmp_path / "out").exists()
    assert torch.load(ckpt / CHECKPOINT, weights_only=False)["step"] == 2
    fetched = {"n": 0}

    class Counting:
        n, description = data.n, data.description

        def get(self, i):
            fetched["n"] += 1
            return data.get(i)

    resumed = heal(_student(family, tmp_path / "c"), None, config, Counting(), tmp_path / "out",
                   checkpoint_dir=ckpt, resume=True, show_progress=False)
    assert fetched["n"] == 2 * config.batch_size  # steps 3 and 4 only
    assert len(resumed["losses"]) == 4
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-4)
    a = load(str(tmp_path / "full")).model.state_dict()
    b = load(str(tmp_path / "out")).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    family = "smolvlm"
    data = training_data("tasks", 4 / TASK_TRAIN_ITEMS)
    config = HealConfig("sft", "tasks", steps=1, batch_size=4)
    heal(_student(family, tmp_path), None, config, data, tmp_path / "out",
         checkpoint_dir=tmp_path / "ckpt", show_progress=False)
    other = HealConfig("sft", "tasks", steps=1, batch_size=4, lr=1e-2)
    with pytest.raises(UsageError, match="other lr"):
        heal(_student(family, tmp_path / "x"), None, other, data, tmp_path / "out2",
             checkpoint_dir=tmp_path / "ckpt", resume=True, show_progress=False)


# ---------------------------------------------------------------------- compatibility
def test_teacher_checks():
    smol, qwen = load_tiny("smolvlm").config, load_tiny("qwen2-vl").config
    with pytest.raises(UsageError, match="teacher t is a qwen2-vl model"):
        check_pair(smol, qwen, hidden_kd=False, teacher_name="t")
    other_vocab = copy.deepcopy(smol)
    other_vocab.get_text_config().vocab_size += 1
    with pytest.raises(UsageError, match="vocabulary"):
        check_pair(smol, other_vocab, hidden_kd=False, teacher_name="t")
    assert "no pruning plan" in check_pair(smol, smol, hidden_kd=True, teacher_name="t")[0]


@pytest.mark.parametrize("changes, match", [
    ({"--teacher": "tiny:qwen2-vl"}, "qwen2-vl model, the student a smolvlm"),
    ({"--fraction": "0"}, "outside"),
    ({"--fraction": "1.5"}, "outside"),
    ({"--data": "tasks:100:test"}, "accuracy is measured on"),
    ({"--resume": True}, "no checkpoint"),
    ({"--recipe": "projector", "--lora": "4"}, "projector only"),
    ({"--ce-weight": "1"}, "applies to --recipe logit-kd"),
    ({"--recipe": "logit-kd", "--teacher": None}, "distils from a teacher"),
    ({"--steps": "0"}, "must be at least 1"),
    ({"--lr": "0"}, "must be positive"),
    pytest.param({"--device": "cuda"}, "no CUDA GPU", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a CUDA GPU is present")),
    pytest.param({"--device": "mps"}, "MPS", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="MPS is present")),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(changes, match, tmp_path, capsys):
    pruned = pruned_checkpoint("smolvlm", [1, 2], tmp_path / "pruned")
    capsys.readouterr()
    options = {"--teacher": "tiny:smolvlm", "--recipe": "sft", "--steps": "1",
               "-o": str(tmp_path / "out"), **changes}
    args = ["heal", str(pruned)]
    for flag, value in options.items():
        args += [flag] if value is True else [] if value is None else [flag, value]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and match in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error:") and "fix:" in lines[1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def _one_line_error(capsys, match):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert match in err and len(lines) == 2 and lines[0].startswith("error:") \
        and "fix:" in lines[1], err


def test_cli_refuses_missing_answers_and_existing_output(tmp_path, capsys):
    pruned = pruned_checkpoint("smolvlm", [1, 2], tmp_path / "pruned")
    data = _jsonl(tmp_path, ["red", None, "red", "red", "red", "red", "red", "red"])
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["heal", str(pruned), "--recipe", "sft", "--data", str(data), "--fraction", "1",
                 "-o", str(tmp_path / "out")])
    assert code == 2
    _one_line_error(capsys, f"{data}:2: item has no answer")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    code = main(["heal", str(pruned), "--recipe", "sft", "-o", str(tmp_path / "out")])
    assert code == 2
    _one_line_error(capsys, "--force")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert not (tmp_path / "out.checkpoint").exists()


def test_cli_refuses_a_teacher_with_another_vocabulary_or_width(tmp_path, capsys):
    """Checked from the config alone, before any weights are loaded."""
    pruned = pruned_checkpoint("smolvlm", [1, 2], tmp_path / "pruned")
    for change, recipe, match in [({"vocab_size": 1}, "logit-kd", "vocabulary"),
                                  ({"hidden_size": 8}, "sft+hidden-kd", "equal hidden sizes")]:
        teacher = tmp_path / f"teacher-{recipe}"
        shutil.copytree(pruned, teacher)
        config = json.loads((teacher / "config.json").read_text())
        config["edgevlm_plan"] = None
        for key, delta in change.items():
            config["text_config"][key] += delta
        (teacher / "config.json").write_text(json.dumps(config))
        capsys.readouterr()
        code = main(["heal", str(pruned), "--teacher", str(teacher), "--recipe", recipe,
                     "-o", str(tmp_path / "out")])
        assert code == 2
        _one_line_error(capsys, match)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()


def test_cli_heals_and_warns_about_a_student_that_is_not_pruned(tmp_path, capsys):
    code = main(["-q", "heal", "tiny:smolvlm", "--teacher", "tiny:smolvlm", "--recipe",
                 "sft+hidden-kd", "--fraction", "0.0002", "--batch-size", "2", "--steps", "2",
                 "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: the student has no pruning plan" in captured.err
    record = json.loads((tmp_path / "out" / "config.json").read_text())["edgevlm_recovery"]
    assert record["recipe"] == "sft+hidden-kd" and record["steps"] == 2
    assert record["data"]["items"] == 4 and not (tmp_path / "out.checkpoint").exists()


# ------------------------------------------------------------------------------ export
@pytest.mark.slow
@pytest.mark.parametrize("target, quant", [("gguf", "f32"), ("onnx", "none")])
def test_export_recover_chains_heal_and_verifies(target, quant, tmp_path, capsys):
    out = tmp_path / target
    code = main(["-q", "export", "--model", "tiny:smolvlm", "--method", "bi", "--ratio", "0.3",
                 "--calib", "builtin:8", "--recover", "sft", "--steps", "2", "--fraction",
                 "0.0002", "--target", target, "--quant", quant, "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recovery"]["recipe"] == "sft" and manifest["plan"]["layers"]
    assert manifest["parity"] and "FAILED" not in captured.out
    healed = json.loads((out / "healed" / "config.json").read_text())
    assert healed["edgevlm_recovery"]["steps"] == 2
    assert healed["text_config"]["num_hidden_layers"] == 6  # 30% of 8 removed
