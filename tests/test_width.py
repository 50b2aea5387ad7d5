"""Issue 10: uniform width pruning with Taylor importance (docs/methods.md section 5)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILIES, load_tiny

from edgevlm.cli import main
from edgevlm.loader import LoadedVLM
from edgevlm.prune import save_pruned
from edgevlm.width import prune_width_, taylor_importance


def _copy(vlm):
    return LoadedVLM(model=copy.deepcopy(vlm.model), processor=vlm.processor,
                     adapter=vlm.adapter, name=vlm.name, path=vlm.path)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_uniform_and_checkpoint_reloads(family, calib, tmp_path):
    from transformers import AutoModelForImageTextToText

    from edgevlm.prompting import encode, model_inputs

    vlm = _copy(load_tiny(family))
    plan = prune_width_(vlm, calib.scoring, 0.5)
    qwen = family.startswith("qwen")
    assert plan.kv_heads == ([2, 2] if qwen else [2, 1]) and plan.intermediate == [128, 64]
    assert bool(plan.attention_note) == qwen
    for layer in vlm.adapter.layers(vlm.model):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.out_features == plan.heads[1] * plan.head_dim == a.o_proj.in_features
        assert a.k_proj.out_features == plan.kv_heads[1] * plan.head_dim
        assert m.gate_proj.out_features == m.up_proj.out_features == m.down_proj.in_features == 64
    save_pruned(vlm, tmp_path / "w")
    stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "w")
    text = stock.config.get_text_config()
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == \
        (plan.heads[1], plan.kv_heads[1], 64)
    assert stock.config.edgevlm_plan["width"]["heads"] == plan.heads
    batch = encode(vlm, calib.heldout[:2])
    with torch.no_grad():
        want, got = vlm.model(**model_inputs(batch)).logits, stock(**model_inputs(batch)).logits
    assert torch.allclose(want, got, atol=1e-5)


def test_taylor_importance_ranks_a_dead_group_and_channel_last(calib):
    """Zero one key/value group's weights and one MLP channel in layer 0: |w * g| is zero
    there, so pruning removes exactly those."""
    vlm = _copy(load_tiny("smolvlm"))
    layer = vlm.adapter.layers(vlm.model)[0]
    a, m = layer.self_attn, layer.mlp
    hd = a.head_dim
    with torch.no_grad():
        a.k_proj.weight[hd:] = 0  # group 1 (heads 2, 3 with kv head 1)
        a.q_proj.weight[2 * hd:] = 0
        a.v_proj.weight[hd:] = 0
        a.o_proj.weight[:, 2 * hd:] = 0
        m.gate_proj.weight[7] = 0
        m.up_proj.weight[7] = 0
        m.down_proj.weight[:, 7] = 0
    scores = taylor_importance(vlm, calib.scoring[:4])
    assert scores[0]["groups"][1] == 0 < scores[0]["groups"][0]
    assert scores[0]["channels"][7] == 0 and scores[0]["channels"].min() == 0
    plan = prune_width_(vlm, calib.scoring, 1 / 128 + 0.5 / 2)  # 1 of 2 groups, 33 channels
    assert plan.kept_groups[0] == [0] and 7 not in plan.kept_channels[0]


def test_cli_writes_plan_and_refuses_layer_options(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["-q", "prune", "tiny:gemma3", "--axis", "width", "--ratio", "0.25",
                 "--calib", "builtin:8", "-o", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["axis"] == "width" and len(plan["kept_channels"]) == 12
    assert plan["parameters"]["after"] < plan["parameters"]["before"]
    for extra, match in ((["--method", "bi"], "takes --ratio only"), ([], "needs --ratio")):
        args = ["prune", "tiny:gemma3", "--axis", "width", *extra, "-o", str(tmp_path / "x")]
        if extra:
            args += ["--ratio", "0.3"]
        assert main(args) == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("target, quant", [("gguf", "f32"), ("onnx", "none")])
def test_width_pruned_exports_and_verifies(target, quant, tmp_path, capsys):
    out = tmp_path / target
    code = main(["-q", "export", "--model", "tiny:smolvlm", "--axis", "width", "--ratio", "0.5",
                 "--calib", "builtin:8", "--target", target, "--quant", quant, "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["width"]["kv_heads"][1] == 1 and manifest["plan"]["layers"] == []
    assert manifest["parity"]
    assert "FAILED" not in captured.out
    config = json.loads((out / "pruned" / "config.json").read_text())["text_config"]
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (1, 64)
