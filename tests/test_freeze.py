"""ShortV freeze mode (docs/methods.md section 4): the PyTorch freeze forward against a naive
reference, the record in config.json and edgevlm's loader, plans, the CLI, GGUF's refusal and
the ONNX freeze prefill graph (parity with PyTorch and what its frozen layers compute)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, load_tiny

from edgevlm import freeze
from edgevlm.loader import LoadedVLM

torch.set_num_threads(1)


def _copy(family: str) -> LoadedVLM:
    base = load_tiny(family)
    return LoadedVLM(model=copy.deepcopy(base.model), processor=base.processor,
                     adapter=base.adapter, name=base.name, path=base.path)


def _frozen_set(family: str) -> list[int]:
    """About 60% of the layers, first and last included (they are where errors show most)."""
    n = load_tiny(family).adapter.num_layers(load_tiny(family).config)
    return sorted({0, n - 1, *range(1, n, 2)})[: max(1, round(0.6 * n))]


def _batch(vlm, calib, n=2):
    from edgevlm.prompting import encode, model_inputs

    return model_inputs(encode(vlm, calib.scoring[:n]))


def _run(vlm, batch):
    with torch.no_grad():
        return vlm.model(**batch, use_cache=True, logits_to_keep=0)


def _kv_diff(a, b, real) -> float:
    """Max |a - b| over every layer's keys and values at real (not padding) positions; a
    sliding-window layer's cache holds only the last positions, compared as such."""
    worst = 0.0
    for la, lb in zip(a.layers, b.layers, strict=True):
        for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
            assert x.shape == y.shape
            keep = real[:, -x.shape[2]:]
            worst = max(worst, float((x - y).transpose(1, 2)[keep].abs().max()))
    return worst


def naive_reference(vlm, batch, layers):
    """The definition: run every layer normally, then give the visual rows of the frozen
    layers their input back (both residual updates masked per token)."""
    visual = vlm.adapter.visual_mask(batch["input_ids"], vlm.config)
    decoder = vlm.adapter.layers(vlm.model)

    def hook(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return torch.where(visual[..., None], hidden, out[0] if isinstance(out, tuple) else out)

    handles = [decoder[i].register_forward_hook(hook, with_kwargs=True) for i in layers]
    try:
        return _run(vlm, batch)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_forward_equals_naive_reference(family, calib):
    vlm = _copy(family)
    batch = _batch(vlm, calib)  # two left-padded prompts: image tokens at different rows
    layers = _frozen_set(family)
    real = batch["attention_mask"].bool()
    normal = _run(vlm, batch)
    reference = naive_reference(vlm, batch, layers)
    freeze.install(vlm, layers)
    got = _run(vlm, batch)
    # The freeze changes the model (else the comparison says nothing) ...
    assert float((normal.logits - reference.logits)[real].abs().max()) > 1e-3
    # ... exactly as the naive definition does: every position's logits and the KV cache.
    assert float((got.logits - reference.logits)[real].abs().max()) < 1e-5
    assert _kv_diff(got.past_key_values, reference.past_key_values, real) < 1e-5


@pytest.mark.parametrize("family", ["qwen2-vl", "gemma3"])
def test_freeze_decode_steps_and_generation(family, calib):
    """Generation: prefill frozen, decode steps (text tokens only) run the normal layers; the
    greedy tokens equal those of the naive reference hooks, which stay on for every step."""
    vlm = _copy(family)
    batch = _batch(vlm, calib, n=1)
    layers = _frozen_set(family)
    gen = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, eos_token_id=[],
               pad_token_id=0)
    visual = vlm.adapter.visual_mask(batch["input_ids"], vlm.config)
    decoder = vlm.adapter.layers(vlm.model)

    def hook(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != visual.shape[1]:
            return out  # a decode step: no visual rows
        return torch.where(visual[..., None], hidden, out)

    handles = [decoder[i].register_forward_hook(hook, with_kwargs=True) for i in layers]
    with torch.no_grad():
        want = vlm.model.generate(**batch, **gen)
    for handle in handles:
        handle.remove()
    freeze.install(vlm, layers)
    with torch.no_grad():
        got = vlm.model.generate(**batch, **gen)
    assert got.tolist() == want.tolist()


def test_install_uninstall_and_text_only_calls(calib):
    vlm = _copy("smolvlm")
    batch = _batch(vlm, calib, n=1)
    before = _run(vlm, batch).logits
    freeze.install(vlm, [1, 2])
    assert freeze.installed_layers(vlm) == [1, 2]
    text_only = {"input_ids": batch["input_ids"][:, -5:],
                 "attention_mask": batch["attention_mask"][:, -5:]}
    frozen_text = _run(vlm, text_only).logits  # no image token: the normal forward
    frozen = _run(vlm, batch).logits
    assert float((frozen - before).abs().max()) > 1e-3
    # a deep copy (what fidelity baselines and compensation twins make) is frozen alike
    twin = LoadedVLM(model=copy.deepcopy(vlm.model), processor=vlm.processor,
                     adapter=vlm.adapter, name=vlm.name, path=vlm.path)
    assert torch.equal(_run(twin, batch).logits, frozen)
    freeze.uninstall(twin)
    assert torch.equal(_run(twin, batch).logits, before)
    assert torch.equal(_run(vlm, batch).logits, frozen)
    freeze.uninstall(vlm)
    assert torch.equal(_run(vlm, text_only).logits, frozen_text)
    assert torch.equal(_run(vlm, batch).logits, before)


def test_plan_freeze_mode():
    from edgevlm.plan import make_plan
    from edgevlm.types import LayerScores

    scores = LayerScores(method="lc", scores=[5.0, 0.1, 0.3, 4.0, 0.2, 3.0])
    plan = make_plan(scores, ratio=0.5, mode="freeze")
    assert (plan.mode, plan.layers, plan.kept) == ("freeze", [1, 2, 4], list(range(6)))
    # Nothing is removed, so Gemma 3's local/global period does not constrain the choice.
    types = ["sliding_attention"] * 5 + ["full_attention"]
    plan = make_plan(scores, n_layers=2, mode="freeze", layer_types=types, layer_period=6)
    assert plan.layers == [1, 4]
    assert make_plan(scores, ratio=0.5, mode="freeze", protect="1").layers == [2, 4, 5]


def _frozen_checkpoint(family: str, dest, layers=None):
    from edgevlm.prune import save_pruned
    from edgevlm.types import PrunePlan

    vlm = _copy(family)
    n = vlm.adapter.num_layers(vlm.config)
    plan = PrunePlan("lc", n, layers or _frozen_set(family), mode="freeze", ratio=0.6)
    freeze.record_(vlm, plan)
    return save_pruned(vlm, dest)


def test_config_record_loader_and_stock_from_pretrained(tmp_path, calib):
    """edgevlm's loader applies the record; stock from_pretrained ignores it (normal forward)."""
    from transformers import AutoModelForImageTextToText

    from edgevlm.loader import load

    folder = _frozen_checkpoint("llava", tmp_path / "frozen")
    record = json.loads((folder / "config.json").read_text())[freeze.FREEZE_CONFIG_KEY]
    assert record["layers"] == _frozen_set("llava") and record["mode"] == "freeze"
    vlm = load(str(folder))
    assert freeze.installed_layers(vlm) == record["layers"]
    batch = _batch(vlm, calib, n=1)
    frozen = _run(vlm, batch).logits
    reference = naive_reference(load_tiny("llava"), batch, record["layers"]).logits
    assert float((frozen - reference).abs().max()) < 1e-5
    stock = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        plain = stock(**batch, logits_to_keep=0).logits
    normal = _run(load_tiny("llava"), batch).logits
    assert float((plain - normal).abs().max()) < 1e-5
    assert float((plain - frozen).abs().max()) > 1e-3


def test_gguf_refuses_freeze_before_any_work(tmp_path, capsys):
    from edgevlm.cli import main

    out = tmp_path / "out"
    # A model that does not exist: refused for GGUF before anything looks for it.
    rc = main(["export", "--model", str(tmp_path / "no-such-model"), "--method", "lc",
               "--ratio", "0.6", "--mode", "freeze", "--target", "gguf", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--target onnx" in err, err
    assert not out.exists()


def test_gguf_refuses_frozen_checkpoint(tmp_path):
    pytest.importorskip("gguf")
    from edgevlm.errors import UnsupportedModelError
    from edgevlm.export.gguf_export import check_gguf_quant, export_gguf

    folder = _frozen_checkpoint("smolvlm", tmp_path / "frozen")
    with pytest.raises(UnsupportedModelError, match="--target onnx"):
        check_gguf_quant("f16", folder)
    with pytest.raises(UnsupportedModelError, match="--target onnx"):
        export_gguf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,match", [
    (["--method", "bi"], "visual LC"),
    (["--method", "lc", "--tokens", "text"], "visual"),
    (["--method", "lc", "--compensate", "4"], "compensate"),
])
def test_freeze_cli_refusals(tmp_path, capsys, argv, match):
    from edgevlm.cli import main

    rc = main(["prune", "tiny:smolvlm", "--ratio", "0.6", "--mode", "freeze", *argv,
               "-o", str(tmp_path / "out")])
    assert rc == 2
    assert match in capsys.readouterr().err


# ------------------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    """family -> (export folder, checkpoint folder), exported and verified once."""
    made = {}

    def get(family):
        if family not in made:
            from edgevlm.export.onnx_export import export_onnx

            root = tmp_path_factory.mktemp(f"freeze-{family}")
            folder = _frozen_checkpoint(family, root / "frozen")
            artifact = export_onnx(folder, root / "export", progress=False)
            artifact.save(root / "export" / "manifest.json")
            made[family] = (root / "export", folder)
        return made[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_freeze_prefill_equals_pytorch(onnx_exports, family, calib):
    from edgevlm.export.onnx_export.freeze_prefill import torch_prefill
    from edgevlm.loader import load
    from edgevlm.runtimes.ort_generate import OnnxVLM
    from edgevlm.types import ExportArtifact

    root, folder = onnx_exports(family)
    manifest = ExportArtifact.load(root / "manifest.json")
    entry = manifest.file("decoder_prefill_freeze")
    assert entry and entry.path == "onnx/onnx/decoder_model_merged_prefill_freeze.onnx"
    assert manifest.io.graphs["decoder_prefill_freeze"]["frozen_layers"] == _frozen_set(family)
    assert manifest.parity["freeze_prefill"]["kv_max_abs_diff"] < 1e-3
    # its checks are the report's (export/parity.py tolerances), printed with the others
    freeze = [c for c in manifest.parity["checks"] if "freeze prefill" in c["name"]]
    assert len(freeze) == 3 and all(c["passed"] and c["tolerance"] for c in freeze)
    from edgevlm.commands import _parity_summary

    assert "fp32 freeze prefill KV cache error" in _parity_summary(manifest.parity)
    assert manifest.parity["greedy_tokens_equal"]
    assert manifest.plan.mode == "freeze" and manifest.plan.layers == _frozen_set(family)

    vlm = load(str(folder))
    runner = OnnxVLM(root / "onnx")
    assert runner.freeze_prefill is not None
    for sample in calib.heldout[:2]:
        ref = torch_prefill(vlm, sample)
        logits, kv = runner.freeze_prefill_outputs(ref["inputs"])
        scale = max(1.0, float(np.abs(ref["logits"]).max()))
        assert float(np.abs(logits - ref["logits"]).max()) < 1e-4 * scale
        assert set(kv) == set(ref["kv"]) == set(runner.decoder.past_names)
        for name, want in ref["kv"].items():
            got = kv[name]
            assert got.dtype == np.float32 and got.shape[:2] == (1, runner.decoder.kv_heads)
            assert got.shape[2:] == (ref["inputs"]["input_ids"].shape[1], runner.decoder.head_dim)
            assert float(np.abs(got[0][:, -want.shape[1]:] - want).max()) < 1e-4
        # and the freeze prefill really differs from the normal decoder's prefill
        normal = OnnxVLM(root / "onnx", freeze=False).generate(ref["inputs"], 1).prefill_logits
        assert float(np.abs(normal - logits).max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["smolvlm", "qwen2-vl", "gemma3"])
def test_onnx_freeze_runner_decodes_like_pytorch(onnx_exports, family, calib):
    """Prefill with the freeze graph, decode with the normal graph: PyTorch's greedy tokens."""
    from edgevlm.export.onnx_export.verify import torch_reference
    from edgevlm.loader import load
    from edgevlm.runtimes.ort_generate import OnnxVLM

    root, folder = onnx_exports(family)
    vlm = load(str(folder))
    for share in (True, False):
        runner = OnnxVLM(root / "onnx", share_buffer=share)
        for sample in calib.heldout[:2]:
            ref = torch_reference(vlm, sample, 8)
            assert runner.generate(ref["inputs"], 8).tokens == ref["tokens"]


def _scope(node) -> str:
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes", "")
    return scopes


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_frozen_layers_compute_text_rows_only(onnx_exports, family):
    """In every frozen layer the Q, O and MLP matrix products take the gathered text rows
    (dimension `text_length`, produced downstream of a Gather by `text_positions`); K and V
    take every row (`sequence_length`); layers that are not frozen run on every row."""
    import re

    import onnx

    root, _ = onnx_exports(family)
    model = onnx.load(str(root / "onnx/onnx/decoder_model_merged_prefill_freeze.onnx"))
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    values = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    producer = {o: n for n in graph.node for o in n.output}

    def rows_dim(name):
        dims = values[name].type.tensor_type.shape.dim
        return dims[-2].dim_param or dims[-2].dim_value

    def derives_from(name, source, ops=None, seen=None) -> bool:
        """Whether `name` is computed from the graph input `source` (through `ops` only)."""
        seen = set() if seen is None else seen
        if name == source:
            return True
        node = producer.get(name)
        if node is None or name in seen or (ops and node.op_type not in ops):
            return False
        seen.add(name)
        return any(derives_from(i, source, ops, seen) for i in node.input)

    def from_text_gather(name, seen=None) -> bool:
        """Whether `name` comes from a Gather along the rows indexed by `text_positions`."""
        seen = set() if seen is None else seen
        node = producer.get(name)
        if node is None or name in seen:
            return False
        seen.add(name)
        if node.op_type == "Gather" and derives_from(node.input[1], "text_positions",
                                                     ("Reshape", "Cast", "Identity")):
            return True
        return any(from_text_gather(i, seen) for i in node.input if i not in weights)

    frozen = _frozen_set(family)
    n_layers = load_tiny(family).adapter.num_layers(load_tiny(family).config)
    seen = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        match = re.search(r"text\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.\w+)'", _scope(node))
        if not match or not any(i in weights for i in node.input):
            continue
        layer, part = int(match.group(1)), match.group(2)
        activation = next(i for i in node.input if i not in weights)
        dim = rows_dim(activation)
        seen[(layer, part)] = dim
        if layer in frozen and part not in ("self_attn.k_proj", "self_attn.v_proj"):
            assert dim == "text_length", (layer, part, dim)
            assert from_text_gather(activation), (layer, part)
        else:
            assert dim == "sequence_length", (layer, part, dim)
    parts = {p for _, p in seen}
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"} <= parts
    assert {layer for layer, _ in seen} == set(range(n_layers))
    # the new text rows go back into the unchanged hidden states once per frozen layer
    assert sum(n.op_type in ("ScatterND", "ScatterElements") for n in graph.node) == len(frozen)
