"""Issue 3: plans, layer removal into stock checkpoints, fidelity, and the CLI around them."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random

import pytest
import torch
from conftest import load_tiny

from edgevlm.cli import main
from edgevlm.errors import UnsupportedModelError, UsageError
from edgevlm.fidelity import fidelity, random_baseline
from edgevlm.loader import LoadedVLM, load
from edgevlm.plan import make_plan, random_plan
from edgevlm.prompting import encode, model_inputs
from edgevlm.prune import prune_, save_pruned
from edgevlm.types import LayerScores, PrunePlan

GEMMA_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 2


def _copy(vlm) -> LoadedVLM:
    return LoadedVLM(model=copy.deepcopy(vlm.model), processor=vlm.processor,
                     adapter=vlm.adapter, name=vlm.name, path=vlm.path)


# ------------------------------------------------------------------------------ plans
def test_plan_drops_lowest_one_shot():
    scores = LayerScores("bi", [0.5, 0.1, 0.3, 0.2, 0.4, 0.9, 0.6, 0.05])
    assert make_plan(scores, ratio=0.25).layers == [1, 7]
    assert make_plan(scores, n_layers=3).layers == [1, 3, 7]
    assert make_plan(scores, n_layers=2, protect="last").layers == [1, 3]
    plan = make_plan(scores, n_layers=2)
    assert plan.kept == [0, 2, 3, 4, 5, 6]
    assert PrunePlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("kwargs, match", [
    ({"ratio": 0.0}, "outside"), ({"ratio": 1.0}, "outside"), ({"ratio": -0.2}, "outside"),
    ({"ratio": 0.99}, "leaves none"), ({"n_layers": 8}, "leaves none"),
    ({"n_layers": 20}, "leaves none"), ({"n_layers": 0}, "at least 1"),
    ({"ratio": 0.01}, "removes no layer"), ({}, "exactly one"),
    ({"ratio": 0.3, "n_layers": 2}, "exactly one"),
])
def test_plan_bad_sizes(kwargs, match):
    with pytest.raises(UsageError, match=match):
        make_plan(LayerScores("bi", [float(i) for i in range(8)]), **kwargs)


def test_gemma_plan_keeps_the_local_global_period():
    values = [0.5, 0.1, 0.3, 0.2, 0.4, 0.9, 0.6, 0.05, 0.7, 0.8, 0.3, 0.2]
    for n in range(1, 12):
        plan = make_plan(LayerScores("bi", values), n_layers=n, layer_types=GEMMA_TYPES,
                         layer_period=6)
        kept = [GEMMA_TYPES[i] for i in plan.kept]
        assert kept == GEMMA_TYPES[: len(kept)], n
    assert make_plan(LayerScores("bi", values), n_layers=6, layer_types=GEMMA_TYPES,
                     layer_period=6).layers == [1, 2, 3, 5, 7, 10]


def test_gemma_plan_refuses_when_the_period_cannot_be_kept():
    with pytest.raises(UnsupportedModelError, match="local/global"):
        make_plan(LayerScores("bi", [0.0] * 12), n_layers=1, protect="last",
                  layer_types=GEMMA_TYPES, layer_period=6)


def test_angular_plan_is_the_best_contiguous_block():
    scores = LayerScores("angular", [0.0] * 8, extra={"n": 3, "block_distances":
                                                        [0.5, 0.4, 0.2, 0.3, 0.35, 0.6]})
    assert make_plan(scores, n_layers=3).layers == [2, 3, 4]
    assert make_plan(scores, n_layers=3, protect="3").layers == [4, 5, 6]
    with pytest.raises(UsageError, match="blocks of 3"):
        make_plan(scores, n_layers=2)


def test_gemma_angular_plan_is_the_best_block_that_keeps_the_period():
    """Removing 2 contiguous layers of 12 keeps the 5-local : 1-global pattern only at the
    end (10, 11); a block of 6 keeps it anywhere. The best valid block wins, not a refusal
    because the best block overall breaks the pattern."""
    distances = [0.5, 0.1, 0.3, 0.2, 0.4, 0.9, 0.6, 0.05, 0.7, 0.8, 0.3]  # blocks of 2
    scores = LayerScores("angular", [0.0] * 12, extra={"n": 2, "block_distances": distances})
    assert make_plan(scores, n_layers=2).layers == [7, 8]  # no pattern: the best block
    plan = make_plan(scores, n_layers=2, layer_types=GEMMA_TYPES, layer_period=6)
    assert plan.layers == [10, 11]
    six = [0.5, 0.4, 0.45, 0.2, 0.3, 0.6, 0.7]  # blocks of 6
    scores = LayerScores("angular", [0.0] * 12, extra={"n": 6, "block_distances": six})
    assert make_plan(scores, n_layers=6, layer_types=GEMMA_TYPES,
                     layer_period=6).layers == [3, 4, 5, 6, 7, 8]
    with pytest.raises(UnsupportedModelError, match="local/global"):
        make_plan(LayerScores("angular", [0.0] * 12, extra={"n": 2, "block_distances": distances}),
                  n_layers=2, protect="last", layer_types=GEMMA_TYPES, layer_period=6)


def test_random_plans_are_valid_and_vary():
    rng = random.Random(0)
    plans = {tuple(random_plan(8, 3, rng).layers) for _ in range(10)}
    assert len(plans) > 1 and all(len(p) == 3 for p in plans)


# ----------------------------------------------------------------------------- pruning
def _plan_for(vlm) -> PrunePlan:
    n = vlm.adapter.num_layers(vlm.config)
    layers = [1, 2, 3, 5, 7, 10] if vlm.adapter.layer_period else [1, 4]
    return PrunePlan("bi", n, layers)


@contextlib.contextmanager
def _skipping(vlm, layers):
    """Run `vlm` unchanged except that decoder `layers` return their input (forward hooks
    on the original modules; nothing is removed or renumbered)."""
    from edgevlm.scoring.vision import skip_layer

    with contextlib.ExitStack() as stack:
        for i in layers:
            stack.enter_context(skip_layer(vlm.adapter.layers(vlm.model)[i]))
        yield


def test_pruned_checkpoint_reloads_with_stock_transformers(tiny, calib, tmp_path):
    from transformers import AutoModelForImageTextToText

    vlm = _copy(tiny)
    plan = _plan_for(vlm)
    prune_(vlm, plan)
    save_pruned(vlm, tmp_path)
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    text_config = stock.config.get_text_config()
    assert text_config.num_hidden_layers == len(plan.kept)
    assert len(vlm.adapter.layers(stock)) == len(plan.kept)
    types = getattr(tiny.config.get_text_config(), "layer_types", None)
    if types:
        assert text_config.layer_types == [types[i] for i in plan.kept]
    assert stock.config.edgevlm_plan == plan.to_dict()
    batch = model_inputs(encode(vlm, calib.scoring[:2]))
    with torch.no_grad():
        # the reloaded checkpoint == the ORIGINAL model with the dropped layers bypassed
        with _skipping(tiny, plan.layers):
            reference = tiny.model(**batch).logits
        torch.testing.assert_close(stock(**batch).logits, reference, atol=1e-5, rtol=1e-5)
        cached = stock.generate(**batch, max_new_tokens=8, do_sample=False)
        uncached = stock.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # The edgevlm loader reads it back too, as a model with fewer layers.
    assert load(str(tmp_path)).adapter.num_layers(stock.config) == len(plan.kept)


def test_pruned_layers_are_renumbered(tiny):
    vlm = _copy(tiny)
    prune_(vlm, _plan_for(vlm))
    for idx, layer in enumerate(vlm.adapter.layers(vlm.model)):
        indices = {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")}
        assert indices == {idx}


def test_plan_for_another_model_is_refused():
    vlm = _copy(load_tiny("llava"))
    with pytest.raises(UsageError, match="plan is for 12"):
        prune_(vlm, PrunePlan("bi", 12, [1]))


# ---------------------------------------------------------------------------- fidelity
class _FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are `row` at every position."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, row):
        super().__init__()
        self.row = row

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


def test_fidelity_kl_value_and_direction_by_hand(calib):
    """Base: uniform over V tokens; pruned: token 0 has probability 3/4, the others share
    1/4. KL(base || pruned) = sum_i 1/V ln((1/V) / q_i) = -ln V - ln(3/4)/V
    - (V-1)/V ln(1/(4(V-1))); the other direction would be 3/4 ln(3V/4) + 1/4 ln(V/(4(V-1)))."""
    base = load_tiny("smolvlm")
    V = base.model.config.get_text_config().vocab_size
    pruned_row = torch.full((V,), -math.log(4 * (V - 1)))
    pruned_row[0] = math.log(0.75)
    make = lambda row: LoadedVLM(model=_FixedLogits(row), processor=base.processor,  # noqa: E731
                                 adapter=base.adapter, name="fixed", path=base.path)
    result = fidelity(make(torch.zeros(V)), make(pruned_row), calib.heldout[:2],
                      show_progress=False)
    expected = -math.log(V) - math.log(0.75) / V + (V - 1) / V * math.log(4 * (V - 1))
    reverse = 0.75 * math.log(0.75 * V) + 0.25 * math.log(V / (4 * (V - 1)))
    assert abs(expected - reverse) > 0.1
    assert result["kl"] == pytest.approx(expected, rel=1e-6)  # fp32 log-softmax
    assert result["positions"] > 0


def test_random_baseline_honours_protected_layers(calib):
    base = load_tiny("llava")
    n = base.adapter.num_layers(base.config)
    result = random_baseline(base, 3, calib.heldout[:1], 6, protected=[0, 1, n - 1],
                             show_progress=False)
    dropped = [run["dropped"] for run in result["runs"]]
    assert all(len(d) == 3 and not {0, 1, n - 1} & set(d) for d in dropped)
    assert len({tuple(d) for d in dropped}) > 1


def _uneven_model():
    """A tiny LLaVA whose layers matter unequally (random init makes them all alike):
    residual branches scaled by factors between 0.05 and 3."""
    vlm = _copy(load_tiny("llava"))
    factors = [3.0, 0.05, 2.0, 0.1, 1.5, 0.08, 2.5, 1.0]
    with torch.no_grad():
        for layer, f in zip(vlm.adapter.layers(vlm.model), factors, strict=True):
            layer.self_attn.o_proj.weight.mul_(f)
            layer.mlp.down_proj.weight.mul_(f)
    return vlm


def test_bi_beats_random_layers_on_heldout_kl():
    from edgevlm.calib import load_calibration
    from edgevlm.scoring import score

    calib = load_calibration("builtin:16", seed=1)
    base = _uneven_model()
    scores = score(base, calib.scoring, "bi", progress=False)
    plan = make_plan(scores, ratio=0.3)
    pruned = _copy(base)
    prune_(pruned, plan)
    ours = fidelity(base, pruned, calib.heldout, show_progress=False)
    baseline = random_baseline(base, len(plan.layers), calib.heldout, 6, show_progress=False)
    assert ours["kl"] < baseline["kl"]["mean"]
    assert ours["top1_agreement"] >= baseline["top1_agreement"]["mean"]


# --------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("args, match", [
    (["--method", "bi", "--ratio", "0"], "outside"),
    (["--method", "bi", "--ratio", "1.5"], "outside"),
    (["--method", "bi", "--n-layers", "50"], "leaves none"),
    (["--method", "bi", "--ratio", "0.99"], "leaves none"),
    (["--method", "nope", "--ratio", "0.3"], "unknown"),
    (["--method", "bi", "--tokens", "pixels", "--ratio", "0.3"], "pixels"),
    (["--method", "bi"], "how many"),
])
def test_cli_prune_bad_inputs(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    code = main(["prune", "tiny:llava", *args, "-o", str(out), "--calib", "builtin:4"])
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_empty_calibration(tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    code = main(["prune", "tiny:llava", "--method", "bi", "--ratio", "0.3",
                 "-o", str(tmp_path / "out"), "--calib", str(empty)])
    assert code == 2 and "images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_prune_then_replay_plan_and_eval(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "prune", "tiny:qwen2-vl", "--method", "bi", "--ratio", "0.25",
                 "-o", str(out), "--calib", "builtin:6"]) == 0
    for name in ("scores.json", "plan.json", "pruned/config.json", "pruned/model.safetensors"):
        assert (out / name).exists(), name
    # Output exists: refused without --force, nothing touched.
    before = (out / "plan.json").read_text()
    assert main(["-q", "prune", "tiny:qwen2-vl", "--method", "bi", "--ratio", "0.25",
                 "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "plan.json").read_text() == before
    # The plan replays on a fresh model and gives the same checkpoint.
    replay = tmp_path / "replay"
    assert main(["-q", "prune", "tiny:qwen2-vl", "--plan", str(out / "plan.json"),
                 "-o", str(replay)]) == 0
    a, b = load(str(out / "pruned")), load(str(replay / "pruned"))
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    capsys.readouterr()
    assert main(["-q", "eval", "tiny:qwen2-vl", str(out / "pruned"), "--calib", "builtin:6",
                 "--baseline", "random:2", "--json", str(tmp_path / "eval.json")]) == 0
    assert "random baseline" in capsys.readouterr().out
    assert (tmp_path / "eval.json").exists()


def test_cli_plan_replay_keeps_the_gemma_pattern(tmp_path, capsys):
    """A plan.json that would break Gemma 3's local/global pattern is refused on replay
    (--plan skips the planner that keeps it); one that keeps it replays."""
    bad = PrunePlan("manual", 12, [0])
    bad.save(tmp_path / "bad.json")
    code = main(["-q", "prune", "tiny:gemma3", "--plan", str(tmp_path / "bad.json"),
                 "-o", str(tmp_path / "out")])
    assert code == 2 and "local/global" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedModelError, match="local/global"):
        prune_(_copy(load_tiny("gemma3")), PrunePlan("manual", 12, [3, 4]))
    PrunePlan("manual", 12, [10, 11]).save(tmp_path / "good.json")
    assert main(["-q", "prune", "tiny:gemma3", "--plan", str(tmp_path / "good.json"),
                 "-o", str(tmp_path / "good")]) == 0


def test_eval_judges_only_heldout_samples(tmp_path, monkeypatch, capsys):
    """Every sample `eval` judges (fidelity, accuracy, random baseline) is held out: none
    of the calibration's scoring samples, which chose the plan. The random plans keep the
    layers the pruned model's plan protected."""
    import edgevlm.accuracy
    import edgevlm.fidelity
    from edgevlm import pipeline

    seen, calibs = [], []
    real_calibration = pipeline.calibration

    def calibration(spec, seed=0):
        calibs.append(real_calibration(spec, seed))
        return calibs[-1]

    def recording(real):
        def wrapper(*args, **kwargs):
            seen.extend(s for a in args if isinstance(a, list) for s in a)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pipeline, "calibration", calibration)
    for module, name in ((edgevlm.fidelity, "fidelity"), (edgevlm.fidelity, "random_baseline"),
                         (edgevlm.accuracy, "task_accuracy")):
        monkeypatch.setattr(module, name, recording(getattr(module, name)))
    vlm = _copy(load_tiny("qwen2-vl"))
    prune_(vlm, PrunePlan("bi", 8, [1, 4], protected=[0, 2, 3, 5, 6]))
    pruned = save_pruned(vlm, tmp_path / "pruned")
    assert main(["-q", "eval", "tiny:qwen2-vl", str(pruned), "--calib", "builtin:6",
                 "--baseline", "random:3", "--json", str(tmp_path / "eval.json")]) == 0
    runs = json.loads((tmp_path / "eval.json").read_text())["random_baseline"]["runs"]
    assert len(runs) == 3 and all(set(r["dropped"]) <= {1, 4, 7} for r in runs)
    (calib,) = calibs
    assert seen and calib.scoring and calib.heldout
    assert all(any(s is h for h in calib.heldout) for s in seen)
    assert not any(s is c for s in seen for c in calib.scoring)


def test_cli_score_reuses_cached_scores(tmp_path):
    from edgevlm.scoring import STATS

    args = ["-q", "score", "tiny:smolvlm", "--method", "bi", "--calib", "builtin:4"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    computed = STATS["computed"]
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    assert STATS["computed"] == computed
    assert (tmp_path / "a" / "scores.json").read_text() == (tmp_path / "b" / "scores.json").read_text()
