"""Issue 11, part 1: vision-tower layer scores, plans and standard pruned checkpoints."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from conftest import load_tiny

from edgevlm.errors import UsageError
from edgevlm.loader import LoadedVLM
from edgevlm.prompting import encode, model_inputs
from edgevlm.prune import save_pruned
from edgevlm.scoring.vision import score_vision, skip_layer
from edgevlm.types import LayerScores, PrunePlan
from edgevlm.vision_prune import (
    make_vision_plan,
    num_vision_layers,
    prune_vision_,
    vision_layers,
)


def _copy(vlm) -> LoadedVLM:
    return LoadedVLM(model=copy.deepcopy(vlm.model), processor=vlm.processor,
                     adapter=vlm.adapter, name=vlm.name, path=vlm.path)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _drop_one(vlm) -> PrunePlan:
    """The plan edgevlm makes to remove one vision layer (first layer lowest-scored)."""
    n = num_vision_layers(vlm.config)
    return make_vision_plan(LayerScores("vision-bi", [float(i) for i in range(n)]), vlm.config,
                            n_layers=1)


def test_vision_pruned_checkpoint_reloads_with_stock_transformers(tiny, calib, tmp_path):
    from transformers import AutoModelForImageTextToText

    vlm = _copy(tiny)
    plan = _drop_one(vlm)
    batch = model_inputs(encode(vlm, calib.scoring[:2]))
    # Reference: the unpruned model with the dropped layers skipped (identity).
    with contextlib.ExitStack() as stack:
        for i in plan.layers:
            stack.enter_context(skip_layer(vision_layers(vlm.adapter, vlm.model)[i]))
        skipped = _logits(vlm.model, batch)
    prune_vision_(vlm, plan)
    in_memory = _logits(vlm.model, batch)
    torch.testing.assert_close(in_memory, skipped, rtol=0, atol=1e-5)
    save_pruned(vlm, tmp_path)
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert len(vision_layers(vlm.adapter, stock)) == len(plan.kept)
    assert torch.equal(_logits(stock, batch), in_memory)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["depth" if "qwen" in tiny.adapter.family
                                  else "num_hidden_layers"] == len(plan.kept)
    assert saved["edgevlm_vision_plan"]["layers"] == plan.layers


def test_qwen25_full_attention_blocks_are_remapped_and_periodic():
    vlm = _copy(load_tiny("qwen2.5-vl"))  # depth 4, full attention in blocks [1, 3]
    plan = make_vision_plan(LayerScores("vision-bi", [0.1, 0.9, 0.2, 0.8]), vlm.config,
                            n_layers=2)
    assert plan.layers == [0, 1]  # a whole period, so "every 2nd block is full" still holds
    prune_vision_(vlm, plan)
    assert vlm.config.vision_config.fullatt_block_indexes == [1]
    assert vlm.adapter.vision(vlm.model).fullatt_block_indexes == [1]


def test_llava_feature_layer_points_at_the_same_kept_layer():
    vlm = _copy(load_tiny("llava"))  # 3 CLIP layers, vision_feature_layer -2 reads layer 1
    # Layer 2 is dead (nothing reads it) and layer 1 is read: the plan removes 2, then 0.
    plan = make_vision_plan(LayerScores("vision-bi", [0.5, 0.1, 0.9]), vlm.config, n_layers=1)
    assert plan.layers == [2]
    plan = make_vision_plan(LayerScores("vision-bi", [0.5, 0.1, 0.9]), vlm.config, n_layers=2)
    assert plan.layers == [0, 2]
    prune_vision_(vlm, PrunePlan("manual", 3, [2]))
    assert vlm.config.vision_feature_layer == -1
    with pytest.raises(UsageError, match="projector reads"):
        prune_vision_(_copy(load_tiny("llava")), PrunePlan("manual", 3, [1]))


def test_vision_scores(calib):
    vlm = load_tiny("smolvlm")
    for method in ("bi", "kl"):
        scores = score_vision(vlm, calib.scoring[:2], method, progress=False, use_cache=False)
        assert scores.method == f"vision-{method}"
        assert len(scores.scores) == num_vision_layers(vlm.config)
        assert all(s > 0 for s in scores.scores)


def test_vision_bi_is_over_patch_tokens_in_fp32(calib):
    """Against a direct computation from the CLIP tower's hidden states (class token out)."""
    import torch.nn.functional as F

    vlm = load_tiny("llava")
    samples = calib.scoring[:2]
    scores = score_vision(vlm, samples, "bi", progress=False, use_cache=False).scores
    pixels = encode(vlm, samples)["pixel_values"]
    with torch.no_grad():
        hidden = vlm.adapter.vision(vlm.model)(pixels, output_hidden_states=True).hidden_states
    expected = [1 - F.cosine_similarity(hidden[i][:, 1:].float(), hidden[i + 1][:, 1:].float(),
                                        dim=-1).mean().item() for i in range(len(hidden) - 1)]
    assert scores == pytest.approx(expected, abs=1e-6)


def test_vision_bi_excludes_padding_patches():
    from edgevlm.scoring.vision import _token_mask

    vlm = load_tiny("smolvlm")
    hidden = torch.zeros(2, 4, 8)
    patch_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    assert torch.equal(_token_mask(vlm, hidden, patch_mask), patch_mask)


# ------------------------------------------------------------------------------ exports
def _vision_pruned_dir(family: str, dest):
    vlm = _copy(load_tiny(family))
    prune_vision_(vlm, _drop_one(vlm))
    return save_pruned(vlm, dest), num_vision_layers(vlm.config)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2.5-vl", "smolvlm", "gemma3"])
def test_vision_pruned_gguf_exports_and_verifies(family, calib, tmp_path):
    """LLaVA is left out: this llama.cpp build computes wrong CLIP-LLaVA image features even
    unpruned (tests/test_gguf_export.py)."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from edgevlm.export.gguf_export import export_gguf

    folder, depth = _vision_pruned_dir(family, tmp_path / "pruned")
    art = export_gguf(folder, tmp_path / "out", quant="f32", mmproj_type="f32", progress=False,
                      samples=calib.heldout[:1], name="v")
    assert art.parity["passed"]
    mmproj = next(f for f in art.files if f.role == "mmproj")
    reader = GGUFReader(str(tmp_path / "out" / mmproj.path))
    assert int(reader.fields["clip.vision.block_count"].parts[-1][0]) == depth


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2.5-vl", "llava"])
def test_vision_pruned_onnx_exports_and_verifies(family, calib, tmp_path):
    from edgevlm.export.onnx_export import export_onnx

    folder, depth = _vision_pruned_dir(family, tmp_path / "pruned")
    art = export_onnx(folder, tmp_path / "out", samples=calib.heldout[:1], gen_tokens=8,
                      progress=False)
    assert art.parity["image_features_max_abs_diff"] < 1e-4
    assert art.parity["greedy_tokens_equal"]
    config = json.loads((tmp_path / "out/onnx/config.json").read_text())
    assert config["vision_config"]["num_hidden_layers" if family == "llava" else "depth"] == depth
