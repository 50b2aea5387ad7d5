"""The FLOP counts behind benchmarks/bench_ttft.py's ideal speed-ups: the freeze prefill count
(edgevlm.freeze.prefill_flops) by hand and against what PyTorch actually executes, and the
benchmark's vision-encoder count against the roofline's."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES, load_tiny

from edgevlm import freeze
from edgevlm.loader import LoadedVLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

torch.set_num_threads(1)

TOY = SimpleNamespace(hidden_size=4, num_attention_heads=2, head_dim=2, num_key_value_heads=1,
                      intermediate_size=8, num_hidden_layers=2, vocab_size=10)


def test_prefill_flops_by_hand():
    visual = [False, True, True, False]  # text rows 0 and 3
    # A layer over every row: k/v 2*4*4*(1*2)*2 = 128, q/o 2*4*4*(2*2)*2 = 256, MLP
    # 2*4*4*8*3 = 768, attention 4*2*2 = 16 per key: causal 16*(1+2+3+4) = 160, dense 16*16.
    # Frozen (rows 0, 3): k/v 128, q/o 128, MLP 384, attention causal 16*(1+4), dense 16*8.
    # lm_head at the last position: 2*4*10 = 80.
    every, every_dense = 128 + 256 + 768 + 160, 128 + 256 + 768 + 256
    text, text_dense = 128 + 128 + 384 + 80, 128 + 128 + 384 + 128
    assert freeze.prefill_flops(TOY, visual, []) == 2 * every + 80
    assert freeze.prefill_flops(TOY, visual, [1]) == every + text + 80
    assert freeze.prefill_flops(TOY, visual, [1], causal=False) == every_dense + text_dense + 80
    ratio = freeze.flops_ratio(TOY, visual, [1])
    assert ratio["ideal_speedup"] == pytest.approx((2 * every + 80) / (every + text + 80))
    assert ratio["dense_ideal_speedup"] == pytest.approx(
        (2 * every_dense + 80) / (every_dense + text_dense + 80))
    # Text rows late in the prompt attend to more keys: the count depends on where they are.
    assert freeze.prefill_flops(TOY, [True, True, False, False], [1]) > freeze.prefill_flops(
        TOY, [False, False, True, True], [1])


def _executed_flops(vlm, embeds, rows) -> int:
    """FLOPs PyTorch counts for the text stack on `embeds` plus the lm_head on the last
    position, with the frozen layers computing `rows` (None: every layer runs normally)."""
    from torch.utils.flop_counter import FlopCounterMode

    stack = vlm.adapter.text_stack(vlm.model)
    state = vlm.model._edgevlm_freeze_state
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if rows is not None:
            state.set(rows, None)
        try:
            hidden = stack(inputs_embeds=embeds, use_cache=False).last_hidden_state
        finally:
            state.clear()
        vlm.adapter.lm_head_module(vlm.model)(hidden[:, -1:])
    return counter.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_flops_equal_what_pytorch_executes(family, calib):
    """The dense count is what the freeze forward (and the normal forward) execute: the
    saving equals PyTorch's own FLOP counter's exactly; the totals differ only by the
    rotary-angle products (a few FLOPs per position), which the count leaves out."""
    from edgevlm.prompting import encode

    base = load_tiny(family)
    vlm = LoadedVLM(model=copy.deepcopy(base.model), processor=base.processor,
                    adapter=base.adapter, name=base.name, path=base.path)
    n = vlm.adapter.num_layers(vlm.config)
    frozen = list(range(1, n, 2)) or [0]
    # PyTorch's FLOP counter does not see the CPU SDPA kernel; eager attention is matmuls.
    vlm.model.set_attn_implementation("eager")
    freeze.install(vlm, frozen)
    ids = encode(vlm, calib.scoring[:1])["input_ids"]
    visual = vlm.adapter.visual_mask(ids, vlm.config)
    assert bool(visual.any()) and not bool(visual.all())
    hidden = int(vlm.config.get_text_config().hidden_size)
    embeds = torch.randn(1, ids.shape[1], hidden)
    if family == "gemma3":  # the text stack takes the embeddings without the image flag
        embeds = vlm.model.get_input_embeddings()(ids)
    rows, _ = freeze.rows_to_compute(visual)
    full = _executed_flops(vlm, embeds, None)
    cut = _executed_flops(vlm, embeds, rows)
    text = vlm.config.get_text_config()
    mask = visual[0].tolist()
    want_full = freeze.prefill_flops(text, mask, [], causal=False)
    want_cut = freeze.prefill_flops(text, mask, frozen, causal=False)
    assert full - cut == want_full - want_cut
    assert cut == pytest.approx(want_cut, rel=5e-3)
    assert full == pytest.approx(want_full, rel=5e-3)


def test_bench_vision_flops_match_the_roofline():
    """bench_ttft's vision count = the roofline's encoder layers + patch embedding +
    projector, and removing layers scales only the layer part."""
    import json

    from bench_ttft import vision_gflops

    from edgevlm.runtimes.roofline import vision_shape_from_config
    from edgevlm.tiny.presets import real_folder

    config = json.loads((real_folder("smolvlm-256m") / "config.json").read_text())
    shape = vision_shape_from_config(config)
    cost = {"tiles": 13, "image_tokens": 13 * 64}
    full, pruned = vision_gflops(config, 12, cost), vision_gflops(config, 9, cost)
    assert full - pruned == pytest.approx(shape.flops(13) / 1e9 / 4)  # 3 of 12 layers
    assert 1.0 < full / (shape.flops(13) / 1e9) < 1.02  # embedding + projector: small
