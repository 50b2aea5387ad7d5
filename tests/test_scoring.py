"""Layer scorers (docs/methods.md 1-3): every method on every family, KL, BI and SVL token
importance checked by hand, an exact-identity layer, LC prefix reuse == naive, SVL scores ==
BI on the attention map's important tokens, and scores.json reuse."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import FAMILIES, load_tiny

from edgevlm.errors import CalibrationError, UsageError
from edgevlm.scoring import SCORERS, STATS, score, score_cached
from edgevlm.scoring.hooks import capture_blocks, forward, head_logprobs, iter_batches
from edgevlm.scoring.svl import top_p_mask
from edgevlm.types import LayerScores

METHODS = ["bi", "angular", "lc", "svl"]
IDENTITY_LAYER = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: with 2 shared cores, torch's intra-op threads spin-wait on each other
    and a busy machine makes this file 10x slower; one thread is also faster unloaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def samples(calib):
    return calib.scoring[:3]


def _score(vlm, samples, method, **kw):
    return score(vlm, samples, method, batch_size=2, progress=False, **kw)


def _with_identity_layer(vlm, index: int = IDENTITY_LAYER):
    """A deep copy whose decoder layer `index` is an exact identity: zero attention output
    projection and MLP down projection (weights and biases)."""
    twin = copy.deepcopy(vlm)
    layer = twin.adapter.layers(twin.model)[index]
    with torch.no_grad():
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    return twin


def _drop_layers(vlm, drop: list[int]):
    """An in-memory stand-in for a pruned checkpoint: fewer layers, renumbered, config sliced."""
    twin = copy.deepcopy(vlm)
    layers = twin.adapter.layers(twin.model)
    for i in sorted(drop, reverse=True):
        del layers[i]
    for new, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    text = twin.model.config.get_text_config()
    keep = [i for i in range(text.num_hidden_layers) if i not in drop]
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in keep]
    text.num_hidden_layers = len(keep)
    return twin


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_every_family(tiny, samples, method):
    result = _score(tiny, samples, method)
    n = tiny.adapter.num_layers(tiny.config)
    assert result.method == method
    assert len(result.scores) == n and all(math.isfinite(s) for s in result.scores)
    assert result.fingerprint == tiny.fingerprint() and result.model == tiny.name
    assert result.calibration["n_samples"] == len(samples)
    assert result.version
    # JSON round trip (scores.json)
    assert LayerScores.from_dict(result.to_dict()).scores == result.scores


def test_block_capture_is_raw_block_io(tiny, samples):
    """Hooks see block inputs/outputs: output of layer i == input of layer i+1, and the last
    block's output through final norm + lm_head gives the model's own next-token logits."""
    batch = next(iter_batches(tiny, samples, 2))
    ins, outs = {}, {}

    def on_block(i, x_in, x_out):
        ins[i], outs[i] = x_in, x_out

    with torch.no_grad(), capture_blocks(tiny, on_block):
        logits = forward(tiny, batch).logits[:, -1]
        mine = head_logprobs(tiny, outs[len(outs) - 1], batch.last)
    assert all(ins[i].dtype == torch.float32 for i in ins)
    for i in range(len(ins) - 1):
        torch.testing.assert_close(outs[i], ins[i + 1])
    torch.testing.assert_close(mine, torch.log_softmax(logits.float(), -1), atol=1e-5, rtol=1e-5)
    # left padding: every row's next-token position is the last column
    assert (batch.last == batch.real.shape[1] - 1).all()
    assert batch.visual.any(dim=1).all() and not (batch.visual & ~batch.real).any()


def test_identity_layer_has_zero_bi_and_is_the_angular_block(tiny, samples):
    """An exact identity layer: BI 0 (its input and output are equal at every token) and the
    n=1 angular block. (LC is checked by hand below: an identity layer gives KL 0 either
    way round, so it cannot tell the direction apart.)"""
    twin = _with_identity_layer(tiny)
    bi = _score(twin, samples, "bi")
    assert bi.scores[IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-6)
    assert bi.ascending()[0] == IDENTITY_LAYER
    assert min(s for i, s in enumerate(bi.scores) if i != IDENTITY_LAYER) > 1e-4
    angular = _score(twin, samples, "angular", n=1)
    assert angular.extra["best_block"] == [IDENTITY_LAYER]


def test_kl_value_and_direction_by_hand():
    """KL(P || Q) = sum P log(P / Q): P = (1/2, 1/2), Q = (9/10, 1/10) gives
    1/2 ln(5/9) + 1/2 ln 5 = 0.510826; the other way round 9/10 ln(9/5) + 1/10 ln(1/5) =
    0.368064."""
    from edgevlm.scoring.lc import kl

    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    assert kl(p, q).item() == pytest.approx(0.5108256, abs=1e-6)
    assert kl(q, p).item() == pytest.approx(0.3680642, abs=1e-6)
    assert kl(p, p).item() == 0.0


def test_bi_by_hand_including_a_zero_vector():
    """BI = 1 - mean cosine over the counted tokens. Rows: (1,0)->(2,0) cosine 1;
    (0,1)->(1,1) cosine 1/sqrt 2; (0,0)->(3,4) a zero input: no defined cosine, counted as
    0.5 (ShortGPT's reference code turns that NaN into 0.5; docs/methods.md section 1), not
    the 0 F.cosine_similarity returns; (1,1)->(-1,-1) cosine -1 but masked out (padding)."""
    from edgevlm.scoring.bi import CosineStats

    x_in = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]])
    x_out = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [3.0, 4.0], [-1.0, -1.0]]])
    mask = torch.tensor([[True, True, True, False]])
    stats = CosineStats(2)
    stats.add(0, x_in, x_out, mask)
    stats.add(1, x_out, x_in, mask)  # zero output this time: the same convention
    expected = 1 - (1 + 2 ** -0.5 + 0.5) / 3  # 0.264298
    assert stats.block_influence("tokens") == pytest.approx([expected, expected], abs=1e-6)
    assert stats.counts == [3, 3]
    with pytest.raises(CalibrationError):
        CosineStats(1).block_influence("tokens")


# A causal attention map over [T0, V1, V2, T3, T4] (rows = queries, each sums to 1).
HAND_ATTENTION = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 0.0],
                                [0.5, 0.5, 0.0, 0.0, 0.0],
                                [0.2, 0.5, 0.3, 0.0, 0.0],
                                [0.1, 0.2, 0.6, 0.1, 0.0],
                                [0.1, 0.1, 0.4, 0.2, 0.2]]])
HAND_VISUAL = torch.tensor([[False, True, True, False, False]])


def test_svl_token_importance_by_hand():
    """docs/methods.md section 3, counting only causally possible partners, averaging the
    two raw terms, then normalising within the modality:
    V1: from visual queries {1,2} (0.5+0.5)/2 = 0.5, from text queries {3,4} (0.2+0.1)/2 =
        0.15 -> 0.325;  V2: from {2} 0.3, from {3,4} (0.6+0.4)/2 = 0.5 -> 0.4;
        normalised over 0.725: 0.448276, 0.551724.
    T0: pays to visual keys <= 0: none, 0; receives from text queries {0,3,4}
        (1+0.1+0.1)/3 = 0.4 -> 0.2;  T3: (0.2+0.6)/2 = 0.4, from {3,4} (0.1+0.2)/2 = 0.15 ->
        0.275;  T4: (0.1+0.4)/2 = 0.25, from {4} 0.2 -> 0.225; normalised over 0.7.
    Normalising each term first would give V1 0.427918; dividing by every query of the
    modality (not the causal ones) V1 0.5 = V2."""
    from edgevlm.scoring.svl import token_importance

    importance = token_importance(HAND_ATTENTION, HAND_VISUAL, ~HAND_VISUAL)
    expected = [0.2 / 0.7, 0.325 / 0.725, 0.4 / 0.725, 0.275 / 0.7, 0.225 / 0.7]
    assert importance[0].tolist() == pytest.approx(expected, abs=1e-6)
    # top half of each modality: the LATER visual token and the two later text tokens
    keep = top_p_mask(importance, HAND_VISUAL, ~HAND_VISUAL, 0.5)
    assert keep.tolist() == [[False, False, True, True, True]]
    padded = torch.tensor([[False, True, True, True, True]])  # T0 as padding: excluded
    importance = token_importance(HAND_ATTENTION, HAND_VISUAL, padded & ~HAND_VISUAL)
    assert importance[0, 0] == 0 and importance[0, 3:].sum().item() == pytest.approx(1.0)


def test_svl_scores_are_bi_on_the_attention_maps_important_tokens(tiny, samples):
    """SVL's layer scores equal BI over the tokens that each layer's own attention map
    (returned by the model with output_attentions, not by SVL's hooks) marks important;
    keeping the first tokens of each modality instead gives other scores."""
    from edgevlm.scoring.bi import CosineStats
    from edgevlm.scoring.hooks import eager_attention
    from edgevlm.scoring.svl import token_importance

    p = 0.5
    n = tiny.adapter.num_layers(tiny.config)
    result = score(tiny, samples, "svl", batch_size=len(samples), progress=False, p=p)
    batch = next(iter_batches(tiny, samples, len(samples)))
    visual, text = batch.tokens("visual"), batch.tokens("text")
    blocks = {}
    with torch.no_grad(), eager_attention(tiny), capture_blocks(
            tiny, lambda i, x_in, x_out: blocks.__setitem__(i, (x_in, x_out))):
        out = tiny.model(**batch.inputs, use_cache=False, output_attentions=True)
    attentions = out.attentions
    assert len(attentions) == n
    important, first = CosineStats(n), CosineStats(n)
    for i, (x_in, x_out) in blocks.items():
        keep = top_p_mask(token_importance(attentions[i].float().mean(1), visual, text),
                          visual, text, p)
        important.add(i, x_in, x_out, keep)
        order = torch.arange(visual.shape[1], dtype=torch.float).expand_as(visual)
        first.add(i, x_in, x_out, top_p_mask(-order, visual, text, p))
    assert result.scores == pytest.approx(important.block_influence("kept"), abs=1e-5)
    assert result.scores != pytest.approx(first.block_influence("first"), abs=1e-5)


def test_lc_prefix_reuse_equals_naive(tiny, samples):
    for tokens in ("visual", "text"):
        fast = _score(tiny, samples, "lc", tokens=tokens)
        slow = _score(tiny, samples, "lc", tokens=tokens, naive=True)
        assert fast.extra["mode"] == "prefix" and slow.extra["mode"] == "naive"
        assert fast.options == slow.options == {"tokens": tokens}  # naive: not part of the result
        for a, b in zip(fast.scores, slow.scores, strict=True):
            assert a == pytest.approx(b, abs=1e-5, rel=1e-4)


def test_bi_token_subsets_differ(tiny, samples):
    results = {t: _score(tiny, samples, "bi", tokens=t).scores for t in ("all", "text", "visual")}
    assert results["all"] != results["text"] != results["visual"] != results["all"]
    # the other subsets come for free in extra and match a dedicated run
    extra = _score(tiny, samples, "bi").extra["by_tokens"]
    assert extra["visual"] == pytest.approx(results["visual"], abs=1e-12)


def test_scores_do_not_depend_on_batching(tiny, samples):
    """Padding is excluded and padded rows keep their own positions."""
    one = score(tiny, samples, "bi", batch_size=1, progress=False)
    three = score(tiny, samples, "bi", batch_size=3, progress=False)
    assert one.scores == pytest.approx(three.scores, abs=1e-6)


def test_svl_keeps_top_p_of_each_modality(tiny, samples):
    p = 0.3
    result = _score(tiny, samples, "svl", p=p)
    expected = 0
    for batch in iter_batches(tiny, samples, 2):
        for mask in (batch.tokens("visual"), batch.tokens("text")):
            expected += sum(math.ceil(p * int(n)) for n in mask.sum(1))
    assert result.extra["kept_tokens"] == [expected] * len(result.scores)
    assert result.options == {"p": p}
    assert result.scores != _score(tiny, samples, "svl", p=1.0).scores
    # the scoring pass switched to eager attention and back
    assert tiny.config.get_text_config()._attn_implementation != "eager"


def test_top_p_mask_picks_highest_per_modality():
    importance = torch.tensor([[0.1, 0.9, 0.5, 0.0, 0.7, 0.2, 0.6]])
    visual = torch.tensor([[False, True, True, True, False, False, False]])
    text = torch.tensor([[True, False, False, False, True, True, False]])  # last column: pad
    keep = top_p_mask(importance, visual, text, 0.5)  # ceil(0.5 * 3) = 2 of each
    assert keep.tolist() == [[False, True, True, False, True, True, False]]
    keep = top_p_mask(importance, visual, text, 0.3)  # ceil(0.3 * 3) = 1 of each
    assert keep.tolist() == [[False, True, False, False, True, False, False]]
    assert top_p_mask(importance, visual, text, 1.0).tolist() == [(visual | text)[0].tolist()]


def test_angular_block_scores(tiny, samples):
    n_layers = tiny.adapter.num_layers(tiny.config)
    result = _score(tiny, samples, "angular", n=3)
    blocks = result.extra["block_distances"]
    assert result.options == {"n": 3} and len(blocks) == n_layers - 2
    assert all(0 <= d <= 1 for d in blocks)
    best = result.extra["best_block"]
    assert len(best) == 3 and blocks[best[0]] == min(blocks)
    assert all(result.scores[i] == min(blocks) for i in best)
    pairwise = result.extra["pairwise_distances"]
    assert pairwise[1][4] == pytest.approx(blocks[1])


def test_scoring_a_pruned_model(family, samples):
    pruned = _drop_layers(load_tiny(family), [1, 4])
    n = pruned.adapter.num_layers(pruned.config)
    for method in ("bi", "lc"):
        assert len(_score(pruned, samples, method).scores) == n


def test_score_cache_reuse_and_invalidation(calib, tmp_path, monkeypatch):
    vlm = load_tiny(FAMILIES[0])  # before moving the cache: the tiny model stays put
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out" / "scores.json"
    kw = dict(calibration=calib.description, progress=False, batch_size=2)
    first_samples = calib.scoring[:2]

    before = dict(STATS)
    first = score_cached(vlm, first_samples, "bi", path=out, **kw)
    cached = list((tmp_path / "cache" / "scores").glob("bi-*.json"))
    assert out.exists() and len(cached) == 1
    assert first.calibration["set_fingerprint"] == calib.description["fingerprint"]
    mtimes = (out.stat().st_mtime_ns, cached[0].stat().st_mtime_ns)

    again = score_cached(vlm, first_samples, "bi", path=out, **kw)
    assert STATS["computed"] == before.get("computed", 0) + 1
    assert STATS["reused"] == before.get("reused", 0) + 1
    assert again.to_dict() == first.to_dict()
    assert (out.stat().st_mtime_ns, cached[0].stat().st_mtime_ns) == mtimes

    # the cache alone serves a new output path
    other = tmp_path / "elsewhere.json"
    score_cached(vlm, first_samples, "bi", path=other, **kw)
    assert STATS["computed"] == before.get("computed", 0) + 1 and other.exists()

    # other calibration samples, other options: recomputed, and the stale out file replaced
    changed = score_cached(vlm, calib.scoring[1:3], "bi", path=out, **kw)
    assert changed.calibration["fingerprint"] != first.calibration["fingerprint"]
    assert LayerScores.load(out).calibration["fingerprint"] == changed.calibration["fingerprint"]
    score_cached(vlm, first_samples, "bi", tokens="visual", **kw)
    assert STATS["computed"] == before.get("computed", 0) + 3

    not_scores = tmp_path / "junk.json"
    not_scores.write_text('{"hello": 1}')
    with pytest.raises(UsageError, match="not an edgevlm scores file"):
        score_cached(vlm, first_samples, "bi", path=not_scores, **kw)


def test_bad_requests_are_usage_errors(samples):
    vlm = load_tiny("llava")
    n_layers = vlm.adapter.num_layers(vlm.config)
    with pytest.raises(UsageError, match="did you mean 'lc'"):
        _score(vlm, samples, "lcc")
    with pytest.raises(UsageError, match="not a valid tokens"):
        _score(vlm, samples, "bi", tokens="images")
    with pytest.raises(UsageError, match="does not take a token subset"):
        _score(vlm, samples, "angular", tokens="all")
    with pytest.raises(UsageError, match="no option 'ratio'"):
        _score(vlm, samples, "bi", ratio=0.3)
    with pytest.raises(UsageError, match=f"not a whole number in 1..{n_layers}"):
        _score(vlm, samples, "angular", n=n_layers + 1)
    with pytest.raises(UsageError, match="p=0"):
        _score(vlm, samples, "svl", p=0)
    with pytest.raises(CalibrationError, match="no calibration samples"):
        _score(vlm, [], "bi")
    with pytest.raises(UsageError, match="batch size"):
        score(vlm, samples, "bi", batch_size=0, progress=False)
    assert {"bi", "angular", "lc", "svl"} <= set(SCORERS.names())
    assert all(s.summary for s in SCORERS)
