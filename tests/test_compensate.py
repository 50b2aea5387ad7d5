"""Issue 10: SVL subspace-compensated layer removal (docs/methods.md section 3)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import load_tiny

from edgevlm.cli import main
from edgevlm.compensate import compensate_, compensated_weight, removed_blocks, top_directions
from edgevlm.loader import LoadedVLM


def test_removed_blocks_are_maximal_runs():
    assert removed_blocks([5, 1, 2, 7, 6]) == [(1, 2), (5, 7)]
    assert removed_blocks([0]) == [(0, 0)]


def test_hand_checked_case():
    """Gap rows along e0 (energy 9 + 4 + 16 = 29) and e1 (0.25): HᵀH = diag(29, 0.25, 0),
    V_1 = ±e0, so (I + V Vᵀ) W doubles W's first row and leaves the others."""
    gap = torch.tensor([[3.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [4.0, 0.0, 0.0]],
                       dtype=torch.float64)
    directions, share = top_directions(gap.T @ gap, 1)
    assert torch.allclose(directions.abs().squeeze(1), torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert share == pytest.approx(29 / 29.25)
    w = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    want = w.clone()
    want[0] *= 2
    assert torch.allclose(compensated_weight(w, directions), want)
    both, _ = top_directions(gap.T @ gap, 2)  # e0 and e1: rows 0 and 1 doubled
    assert torch.allclose(compensated_weight(w, both), w * torch.tensor([[2.0], [2.0], [1.0]],
                                                                        dtype=torch.float64))


def _copy(vlm):
    return LoadedVLM(model=copy.deepcopy(vlm.model), processor=vlm.processor,
                     adapter=vlm.adapter, name=vlm.name, path=vlm.path)


@pytest.mark.parametrize("family", ["qwen2-vl", "smolvlm"])
def test_only_the_layer_before_each_block_is_edited_as_specified(family, calib):
    """Independently of the module: capture each block's gap with plain forward hooks, take
    V_k from an SVD, and compare every decoder weight."""
    from edgevlm.prompting import encode, model_inputs

    base = load_tiny(family)
    vlm, samples, dropped, k = _copy(base), calib.scoring[:4], [2, 3, 6], 3
    layers = base.adapter.layers(base.model)
    seen = {}
    handles = [layers[i].register_forward_hook(
        lambda m, a, kw, out, i=i: seen.__setitem__(i, (kw.get("hidden_states", a[0] if a else None),
                                                        out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True) for i in (2, 3, 6)]
    gaps = {(2, 3): [], (6, 6): []}
    for start in range(0, len(samples), 2):
        batch = encode(base, samples[start:start + 2])
        with torch.no_grad():
            base.model(**model_inputs(batch))
        real = batch["attention_mask"].bool()
        gaps[(2, 3)].append((seen[3][1] - seen[2][0])[real])
        gaps[(6, 6)].append((seen[6][1] - seen[6][0])[real])
    for h in handles:
        h.remove()
    record = compensate_(vlm, dropped, samples, k, batch_size=2)
    assert [e["layer"] for e in record["edits"]] == [1, 5] and record["k"] == k
    before, after = base.model.state_dict(), vlm.model.state_dict()
    for (first, _), gap in gaps.items():
        v = torch.linalg.svd(torch.cat(gap).double(), full_matrices=False).Vh[:k].T
        key = next(n for n in before if f"layers.{first - 1}.mlp.down_proj.weight" in n)
        want = (torch.eye(v.shape[0], dtype=torch.float64) + v @ v.T) @ before[key].double()
        assert torch.allclose(after[key].double(), want, atol=1e-4), key
    edited = {n for n in before if not torch.equal(before[n], after[n])}
    assert edited == {n for n in before if "mlp.down_proj" in n
                      and any(f"layers.{i}." in n for i in (1, 5))}


def test_block_at_layer_zero_is_skipped(calib):
    vlm = _copy(load_tiny("smolvlm"))
    record = compensate_(vlm, [0, 1], calib.scoring[:2], 2)
    assert record["edits"] == [] and record["skipped"] == [[0, 1]]


def test_prune_records_it_and_eval_compares(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "prune", "tiny:llava", "--method", "bi", "--n-layers", "2",
                 "--compensate", "4", "--calib", "builtin:8", "-o", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    config = json.loads((out / "pruned" / "config.json").read_text())
    assert plan["compensation"]["k"] == 4
    assert config["edgevlm_plan"]["compensation"] == plan["compensation"]
    capsys.readouterr()
    assert main(["-q", "eval", "tiny:llava", str(out / "pruned"), "--calib", "builtin:8",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert "without compensation (same layers removed)" in capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["uncompensated"]["fidelity"]["kl"] != result["fidelity"]["kl"]


def test_bad_rank_is_refused(tmp_path, capsys):
    code = main(["prune", "tiny:llava", "--method", "bi", "--n-layers", "2", "--compensate", "0",
                 "-o", str(tmp_path / "o")])
    assert code == 2 and "--compensate 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
