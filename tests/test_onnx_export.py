"""ONNX export (issue 4): transformers.js layout, builder decoder, torch.onnx vision and
embeddings, quantized variants, verification against PyTorch, the torch-free reference loop.

Exports are shared per family (module-scoped) to keep the file fast on small machines.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tiny, pruned_checkpoint
from PIL import Image

from edgevlm.calib import CalibSample
from edgevlm.errors import UnsupportedModelError, UsageError
from edgevlm.types import ExportArtifact

pytestmark = pytest.mark.slow

# family -> (decoder quant, vision quant): each builder quant path is covered by two families;
# gemma3 takes the torch.onnx decoder path (bidirectional image attention), quantized to q4.
CASES = {
    "smolvlm": ("q4", "int8"),
    "llava": ("int8", "none"),
    "qwen2.5-vl": ("q4", "none"),
    "qwen2-vl": ("int8", "int8"),
    "gemma3": ("q4", "none"),
}
DECODER_PATH = {"gemma3": "torch.onnx"}
GEN_TOKENS = 16


def _samples(sizes=((56, 56),)):
    rng = np.random.default_rng(0)
    return [CalibSample(image=Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
                        prompt="What is in this picture?", answer=None, source=f"test:{w}x{h}")
            for w, h in sizes]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> (out_root, ExportArtifact), exported lazily once per module."""
    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.loader import materialize_tiny

    done = {}

    def get(family):
        if family not in done:
            out = tmp_path_factory.mktemp(f"onnx-{family}")
            quant, vquant = CASES[family]
            art = export_onnx(materialize_tiny(f"tiny:{family}"), out, quant=quant,
                              vision_quant=vquant, samples=_samples(((56, 56), (90, 60))),
                              gen_tokens=GEN_TOKENS, progress=False)
            done[family] = (out, art)
        return done[family]

    return get


@pytest.mark.parametrize("family", list(CASES))
def test_export_layout_and_parity(exports, family):
    out, art = exports(family)
    quant, vquant = CASES[family]
    root = out / "onnx"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
                 "onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx",
                 "onnx/decoder_model_merged.onnx"):
        assert (root / name).is_file(), name
    # onnxruntime-genai's config comes with (only) the builder's decoder
    assert (root / "genai_config.json").is_file() == (family not in DECODER_PATH)
    suffix = {"int8": "_quantized", "q4": "_q4"}[quant]
    assert (root / f"onnx/decoder_model_merged{suffix}.onnx").is_file()
    assert (root / "onnx/vision_encoder_quantized.onnx").is_file() == (vquant == "int8")
    # Nothing but the export: no scratch folders, no builder leftovers.
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "onnx"]
    assert not list(root.rglob("model.onnx*"))

    roles = {f.role: f for f in art.files}
    assert {"vision_encoder", "embed_tokens", "decoder", f"decoder_{quant}"} <= set(roles)
    for entry in art.files:
        assert (out / entry.path).stat().st_size == entry.bytes and len(entry.sha256) == 64
    assert art.target == "onnx" and art.io.family == family
    assert art.io.graphs["decoder"]["path"] == DECODER_PATH.get(family, "genai-builder")
    assert art.io.num_layers == load_tiny(family).adapter.num_layers(load_tiny(family).config)
    assert {"onnx", "onnxruntime", "onnxruntime-genai", "opset"} <= set(art.versions)

    parity = art.parity
    assert parity["greedy_tokens_equal"] and parity["greedy_equal_steps"] == [GEN_TOKENS] * 2
    assert parity["prefill_logits_max_abs_diff"] < 1e-3
    assert parity["image_features_max_abs_diff"] < 1e-3
    for name in [f"decoder_{quant}"] + (["vision_encoder_int8"] if vquant == "int8" else []):
        agreement = parity["quantized"][name]["top1_agreement"]
        assert 0.0 <= agreement <= 1.0
    # manifest round trip
    art.save(out / "manifest.json")
    assert ExportArtifact.load(out / "manifest.json").parity == json.loads(json.dumps(parity))


@pytest.mark.parametrize("family", list(CASES))
def test_one_graph_serves_prompt_lengths_and_image_sizes(exports, family):
    """Prefill of 1 and 100+ tokens and two image sizes through the same graphs."""
    import torch

    from edgevlm.export.onnx_export.verify import torch_reference
    from edgevlm.runtimes.ort_generate import OnnxVLM

    out, _ = exports(family)
    vlm = load_tiny(family)
    runner = OnnxVLM(out / "onnx")
    ids = torch.randint(10, 200, (1, 130))
    for n in (1, 130):
        with torch.no_grad():
            ref = vlm.model(input_ids=ids[:, :n]).logits[0, -1].numpy()
        got = runner.generate({"input_ids": ids[:, :n].numpy()}, 1).prefill_logits
        assert np.abs(got - ref).max() < 1e-3
    lengths = set()
    for sample in _samples(((40, 40), (128, 32))):
        ref = torch_reference(vlm, sample, 4)
        run = runner.generate(ref["inputs"], 4)
        assert np.abs(run.image_features - ref["features"]).max() < 1e-3
        assert run.tokens == ref["tokens"]
        lengths.add(len(run.image_features))
    if family in ("smolvlm", "qwen2-vl", "qwen2.5-vl"):  # fixed-size encoders: llava, gemma3
        assert len(lengths) == 2


def test_qwen25_attention_windows_in_graph(exports):
    """A 224x168 image spans 2x2 of Qwen2.5-VL's attention windows: the graph, fed only the
    patches and the grid, restricts its windowed blocks to each window as torch does."""
    from edgevlm.export.onnx_export.verify import torch_reference
    from edgevlm.runtimes.ort_generate import OnnxVLM

    out, _ = exports("qwen2.5-vl")
    vlm = load_tiny("qwen2.5-vl")
    ref = torch_reference(vlm, _samples(((224, 168),))[0], 4)
    vcfg = vlm.config.vision_config
    units = ref["inputs"]["image_grid_thw"][0, 1:] // vcfg.spatial_merge_size
    assert (units > vcfg.window_size // vcfg.spatial_merge_size // vcfg.patch_size).all()
    run = OnnxVLM(out / "onnx").generate(ref["inputs"], 4)
    assert np.abs(run.image_features - ref["features"]).max() < 1e-4
    assert run.tokens == ref["tokens"]


@pytest.mark.parametrize("family", ["smolvlm", "llava", "gemma3"])
def test_vision_attention_is_fused(exports, family):
    """Unmasked vision towers attend through onnxruntime's MultiHeadAttention (flash attention
    on the CPU: no (heads, patches, patches) tensor), fed (B, S, hidden) on all three inputs,
    which is what keeps it off the op's score-materialising cross-attention path."""
    import onnx

    out, _ = exports(family)
    graph = onnx.load(out / "onnx" / "onnx" / "vision_encoder.onnx").graph
    ops = [node.op_type for node in graph.node]
    assert "Softmax" not in ops and "IsNaN" not in ops
    mha = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert mha and all(node.domain == "com.microsoft" and len(node.input) == 3 for node in mha)


def test_shared_kv_buffer_matches_feeding_present_back(exports):
    from edgevlm.export.onnx_export.verify import torch_reference
    from edgevlm.runtimes.ort_generate import OnnxVLM

    out, _ = exports("qwen2.5-vl")
    ref = torch_reference(load_tiny("qwen2.5-vl"), _samples()[0], 8)
    shared = OnnxVLM(out / "onnx").generate(ref["inputs"], 8)
    copied = OnnxVLM(out / "onnx", share_buffer=False).generate(ref["inputs"], 8)
    assert shared.tokens == copied.tokens == ref["tokens"]
    np.testing.assert_allclose(shared.prefill_logits, copied.prefill_logits, atol=1e-5)


def test_reference_loop_runs_without_torch(exports, tmp_path):
    """edgevlm.runtimes.ort_generate is what a device runs: numpy + onnxruntime only."""
    from edgevlm.export.onnx_export.verify import torch_reference

    out, _ = exports("smolvlm")
    ref = torch_reference(load_tiny("smolvlm"), _samples()[0], 6)
    np.savez(tmp_path / "inputs.npz", **ref["inputs"])
    code = f"""
import sys
for name in ("torch", "transformers"):
    sys.modules[name] = None  # any import of them now fails
import numpy as np
from edgevlm.runtimes.ort_generate import OnnxVLM
inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
print(OnnxVLM({str(out / 'onnx')!r}).generate(inputs, 6).tokens)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ref["tokens"]


def test_pruned_export_has_fewer_layers(tmp_path):
    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.runtimes.ort_generate import OnnxVLM

    pruned = pruned_checkpoint("llava", [2, 5], tmp_path / "pruned")
    art = export_onnx(pruned, tmp_path / "out", samples=_samples(), gen_tokens=8, progress=False)
    assert art.io.num_layers == 6
    runner = OnnxVLM(tmp_path / "out" / "onnx")
    assert runner.decoder.num_layers == 6
    assert art.parity["greedy_tokens_equal"]
    config = json.loads((tmp_path / "out/onnx/config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6


def test_bad_inputs():
    from edgevlm.export.onnx_export import (
        ONNX_QUANTS,
        check_onnx_family,
        check_onnx_quant,
        export_onnx,
    )

    assert ONNX_QUANTS == ("none", "int8", "q4")
    with pytest.raises(UsageError, match="none, int8, q4"):
        check_onnx_quant("q3")
    with pytest.raises(UsageError, match="none, int8"):
        check_onnx_quant("none", vision_quant="q4")
    with pytest.raises(UnsupportedModelError, match="mllama") as info:
        check_onnx_family("mllama")
    assert info.value.exit_code == 2
    with pytest.raises(UsageError):  # before any work: the folder need not even exist
        export_onnx(Path("/nonexistent"), Path("/nonexistent-out"), quant="fp8")


def test_gemma3_image_tokens_attend_both_ways(exports):
    """The reason gemma3 has a torch.onnx decoder: image tokens, marked by the last channel of
    inputs_embeds (1 from the vision encoder, 0 from embed_tokens), see each other both ways in
    the graph; unmarked, the same rows are causal, as torch is without token_type_ids."""
    import torch

    from edgevlm.export.onnx_export.verify import torch_reference
    from edgevlm.runtimes.ort_generate import OnnxVLM

    vlm = load_tiny("gemma3")
    ref = torch_reference(vlm, _samples()[0], 2)
    out, _ = exports("gemma3")
    runner = OnnxVLM(out / "onnx")
    np.testing.assert_allclose(runner.generate(ref["inputs"], 2).prefill_logits, ref["logits"],
                               atol=1e-4)
    ids = ref["inputs"]["input_ids"]
    embeds = runner.embeddings(ids, runner.encode_image(ref["inputs"]))
    image = ids[0] == vlm.config.image_token_id
    assert embeds[0, image, -1].all() and not embeds[0, ~image, -1].any()
    embeds[..., -1] = 0
    positions, _ = runner.prompt_positions(ids, ref["inputs"])
    causal = runner.decoder.cache(ids.shape[1]).run(embeds, positions)
    with torch.no_grad():
        batch = {k: torch.from_numpy(v) for k, v in ref["inputs"].items() if k != "token_type_ids"}
        torch_causal = vlm.model(**batch).logits[0, -1].numpy()
    assert np.abs(torch_causal - ref["logits"]).max() > 1e-2  # clearly different
    np.testing.assert_allclose(causal, torch_causal, atol=1e-4)


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    """Beyond tolerance -> VerificationError, and the CLI's staging leaves no output folder."""
    from edgevlm.errors import VerificationError
    from edgevlm.export import parity
    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.loader import materialize_tiny
    from edgevlm.outdir import staged_dir

    # nothing can pass a negative tolerance
    monkeypatch.setitem(parity.TOLERANCES, "f32", parity.Tolerance(-1.0, 1.0, 1.0))
    out = tmp_path / "export"
    with pytest.raises(VerificationError, match="prefill logits"):
        with staged_dir(out) as stage:
            export_onnx(materialize_tiny("tiny:llava"), stage, samples=_samples(), gen_tokens=2,
                        progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_runner_greedy_tokens_equal_pytorch(exports, family):
    """The torch-free runner (numpy preprocessing + the three graphs) generates exactly what
    PyTorch generates from the HF processor's inputs, image included."""
    import torch

    from edgevlm.devices import get_profile
    from edgevlm.prompting import chat_batch, chat_text
    from edgevlm.runtimes.bench import decode_at, make_runner

    out, art = exports(family)
    art.save(out / "manifest.json")
    runner, _, _ = make_runner(out, get_profile("laptop-x86"))
    runner.decoder_quant = runner.vision_quant = "none"  # fp32 graphs: exact parity
    runner.load()
    image = _samples(((90, 60),))[0].image
    prompt = "What is in this picture?"
    trace = runner.generate(image, prompt, max_tokens=GEN_TOKENS, ignore_eos=True)
    vlm = load_tiny(family)
    batch = chat_batch(vlm.processor, [chat_text(vlm.processor, prompt)], [[image]],
                       return_tensors="pt")
    model = copy.deepcopy(vlm.model)
    model.generation_config.eos_token_id = None  # generate exactly GEN_TOKENS, as the runner
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=GEN_TOKENS, do_sample=False,
                             pad_token_id=0)
    assert trace.tokens == ids[0, batch["input_ids"].shape[1]:].tolist()
    assert trace.prompt_tokens == batch["input_ids"].shape[1]
    assert trace.text == runner.pre.decode(trace.tokens)
    # bench_footprint's decode after N cached text tokens runs on every family's graphs.
    decoded = decode_at(runner, 24, 4)
    assert decoded["tokens"] == 4 and decoded["decode_tok_s"] > 0


# The quantization each family's shared export above does not cover.
OTHER_QUANT = {"smolvlm": "int8", "llava": "q4", "qwen2.5-vl": "int8", "qwen2-vl": "q4",
               "gemma3": "int8"}


def test_every_family_runs_both_quantized_variants(family, tmp_path):
    """With the shared exports above, every family's int8 and q4 decoders load, run and
    have their top-1 agreement recorded."""
    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.loader import materialize_tiny

    quant = OTHER_QUANT[family]
    art = export_onnx(materialize_tiny(f"tiny:{family}"), tmp_path, quant=quant,
                      samples=_samples(), gen_tokens=4, progress=False)
    record = art.parity["quantized"][f"decoder_{quant}"]
    assert 0.0 <= record["top1_agreement"] <= 1.0 and record["steps"] > 0
    assert art.file(f"decoder_{quant}") is not None
