"""GGUF export: real writer, real llama.cpp (llama-cpp-python), real tiny transformers models."""

from __future__ import annotations

import base64
import copy
import io

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from conftest import load_tiny, pruned_checkpoint  # noqa: E402

from edgevlm.errors import UnsupportedModelError, UsageError, VerificationError  # noqa: E402

# LLaVA is absent: this llama.cpp build computes wrong CLIP-LLaVA image features (tested
# below as a caught failure).
PARITY_FAMILIES = ["smolvlm", "qwen2-vl", "qwen2.5-vl", "gemma3"]


def _tiny_dir(name: str):
    from edgevlm.loader import materialize_tiny

    return materialize_tiny(f"tiny:{name}")


def _parity_dir(family: str):
    return _tiny_dir(family)


def _blocks(path) -> tuple[int, set[int]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    count = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    groups = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    return count, groups


@pytest.fixture(scope="module", params=PARITY_FAMILIES)
def f32_export(request, tmp_path_factory):
    """(family, out dir, artifact) of one verified f32/f32 export, shared by the tests below."""
    from edgevlm.export.gguf_export import export_gguf

    family = request.param
    out = tmp_path_factory.mktemp(f"gguf-{family}")
    art = export_gguf(_parity_dir(family), out, quant="f32", mmproj_type="f32", progress=False,
                      name=f"tiny-{family}")
    return family, out, art


@pytest.mark.slow
def test_f32_parity_in_llama_cpp(f32_export):
    family, out, art = f32_export
    p = art.parity
    assert p["passed"]
    # qwen2vl: this llama.cpp build runs text RMSNorm without epsilon (issue's 1e-2 tolerance);
    # against a PyTorch model with eps 0 the qwen2vl file matches like the others
    assert p["text_logits_max_abs_diff"] < (1e-2 if family.startswith("qwen") else 1e-3)
    assert p.get("text_logits_max_abs_diff_vs_reference", 0.0) < 1e-3
    assert p["image_embedding_max_abs_diff"] < 1e-3 * max(1.0, p["image_embedding_max_abs"])
    assert p["greedy_tokens_equal"] and p["greedy_steps"] >= 16
    assert p["text_top1_agreement"] == 1.0 and p["tokenizer_matches"]
    roles = {f.role: f for f in art.files}
    assert set(roles) == {"text_model", "mmproj"}
    assert roles["text_model"].path == f"gguf/tiny-{family}-f32.gguf"
    assert roles["mmproj"].path == f"gguf/mmproj-tiny-{family}-f32.gguf"
    for entry in art.files:
        assert (out / entry.path).stat().st_size == entry.bytes
        assert len(entry.sha256) == 64
    assert art.target == "gguf" and art.io.family == family
    assert art.io.num_layers == (12 if family == "gemma3" else 8)
    assert art.versions["llama.cpp"]["llama_cpp_python"]
    # nothing but the two files (no intermediate, no partial)
    assert sorted(p.name for p in (out / "gguf").iterdir()) == sorted(
        (out / f.path).name for f in art.files)


@pytest.mark.slow
def test_f32_metadata_llama_cpp_needs(f32_export):
    """The keys llama.cpp cannot run these families without, read back from the files."""
    from gguf import GGUFReader

    family, out, art = f32_export
    text = GGUFReader(str(out / art.file("text_model").path))
    mm = GGUFReader(str(out / art.file("mmproj").path))

    def val(reader, key):
        field = reader.fields[key]
        return [field.parts[i].tolist()[0] if field.types[-1].name != "STRING"
                else bytes(field.parts[i]).decode() for i in field.data]

    arch = val(text, "general.architecture")[0]
    assert arch == {"smolvlm": "llama", "gemma3": "gemma3"}.get(family, "qwen2vl")
    assert val(mm, "clip.vision.projection_dim") == [64]
    projector = val(mm, "clip.projector_type")[0]
    names = {t.name for t in mm.tensors}
    if family.startswith("qwen"):
        assert val(text, "qwen2vl.rope.dimension_sections") == [2, 3, 3, 0]
        assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.blk.0.attn_q.weight",
                "v.blk.0.attn_k.weight", "v.blk.0.attn_v.weight"} <= names
        assert not any("attn_qkv" in n for n in names)
    if family == "qwen2.5-vl":
        assert projector == "qwen2.5vl_merger"
        assert val(mm, "clip.vision.n_wa_pattern") == [2]
        assert val(mm, "clip.vision.window_size") == [112]
    if family == "qwen2-vl":
        assert projector == "qwen2vl_merger"
    if family == "gemma3":
        assert projector == "gemma3"
        assert val(mm, "clip.vision.projector.scale_factor") == [2]  # 8x8 patches -> 4x4
        assert val(text, "gemma3.attention.sliding_window") == [32]


@pytest.mark.parametrize("family", ["smolvlm", "llava"])
def test_mmproj_reads_a_hub_layout_processor(family, tmp_path):
    """Hub checkpoints (SmolVLM-256M, LLaVA-1.5, Gemma 3) keep the image processor's settings
    in preprocessor_config.json and only the processor's own keys in processor_config.json:
    the mmproj must carry the settings transformers reads from there (the tile size a SmolVLM
    image is split at, CLIP's normalisation)."""
    import json
    import shutil

    from gguf import GGUFReader

    from edgevlm.export.gguf_export import export_gguf
    from edgevlm.loader import load

    folder = tmp_path / "hub"
    shutil.copytree(_tiny_dir(family), folder)
    processor = json.loads((folder / "processor_config.json").read_text())
    image = processor.pop("image_processor")
    image["image_mean"] = [0.48145466, 0.4578275, 0.40821073]  # CLIP's, not the 0.5 default
    image["image_std"] = [0.26862954, 0.26130258, 0.27577711]
    if family == "smolvlm":
        image["size"] = {"longest_edge": 3 * image["max_image_size"]["longest_edge"]}
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    (folder / "processor_config.json").write_text(json.dumps(processor))
    hf = load(str(folder)).processor.image_processor  # transformers reads this layout
    assert list(hf.image_mean) == image["image_mean"]

    art = export_gguf(folder, tmp_path / "out", quant="f32", mmproj_type="f32", verify=False,
                      progress=False)
    fields = GGUFReader(str(tmp_path / "out" / art.file("mmproj").path)).fields
    assert fields["clip.vision.image_mean"].contents() == pytest.approx(image["image_mean"])
    assert fields["clip.vision.image_std"].contents() == pytest.approx(image["image_std"])
    if family == "smolvlm":
        assert fields["clip.vision.preproc_image_size"].contents() == hf.size["longest_edge"]


@pytest.mark.slow
@pytest.mark.parametrize("family,quant,main", [("smolvlm", "q8_0", "Q8_0"),
                                               ("smolvlm-k256", "q4_k_m", "Q4_K"),
                                               ("qwen2-vl", "q8_0", "Q8_0"),
                                               ("qwen2.5-vl-k256", "q4_k_m", "Q4_K"),
                                               ("gemma3-k256", "q4_k_m", "Q4_K")])
def test_quantized_exports_run_and_record_agreement(family, quant, main, tmp_path):
    from edgevlm.export.gguf_export import export_gguf

    art = export_gguf(_tiny_dir(family), tmp_path, quant=quant, mmproj_type="q8_0"
                      if quant == "q8_0" else "f16", progress=False, gen_tokens=4)
    q = art.quantization
    assert q["decoder"] == quant and q["text_tensor_types"].get(main, 0) > 0
    assert q["fallback_tensors"] == []  # tiny shapes are block multiples
    assert 0.0 <= art.parity["text_top1_agreement"] <= 1.0
    assert art.parity["greedy_steps"] > 0
    assert not list((tmp_path / "gguf").glob(".*"))  # intermediate f32 file removed


@pytest.mark.slow
@pytest.mark.parametrize("family,drop", [("smolvlm", (2, 5)),
                                         # 6 consecutive layers: the local/global period holds
                                         ("gemma3", (1, 2, 3, 4, 5, 6))])
def test_pruned_checkpoint_block_count_and_parity(family, drop, tmp_path):
    from edgevlm.export.gguf_export import export_gguf

    pruned = pruned_checkpoint(family, list(drop), tmp_path / f"pruned-{family}")
    art = export_gguf(pruned, tmp_path / "out", quant="f32", mmproj_type="f32", progress=False,
                      gen_tokens=8)
    kept = (12 if family == "gemma3" else 8) - len(drop)
    count, groups = _blocks(tmp_path / "out" / art.file("text_model").path)
    assert count == kept and groups == set(range(kept))
    assert art.io.num_layers == kept and art.parity["passed"]
    assert sorted(art.plan.layers) == sorted(drop)  # the pruning stage's plan, carried along


def _gemma3_config(n_layers: int = 12, drop=(), **text) -> dict:
    """config.json of the tiny Gemma 3 as a pruning plan would leave it (no weights needed:
    the refusals happen before anything is read)."""
    from edgevlm.export.gguf_export.source import read_config

    cfg = copy.deepcopy(read_config(_tiny_dir("gemma3")))
    tcfg = cfg["text_config"]
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
               for i in range(n_layers)]
    tcfg.update(num_hidden_layers=n_layers - len(drop),
                layer_types=[t for i, t in enumerate(pattern) if i not in drop], **text)
    if drop:
        cfg["edgevlm_plan"] = {"method": "bi", "n_layers": n_layers, "layers": list(drop)}
    return cfg


def test_gemma3_refusals_say_why_and_how():
    from edgevlm.export.gguf_export import check_gguf_quant

    check_gguf_quant("f16", _gemma3_config(drop=(0, 1, 2, 3, 4, 5)))  # period kept
    with pytest.raises(UsageError, match="period of 6") as err:
        check_gguf_quant("f16", _gemma3_config(drop=(2, 7)))  # layers shift: 5 and 11 move
    assert "pruned" in err.value.what and "6 consecutive" in err.value.fix
    # Gemma-3-27B shape (hidden 5376, 32 heads of 128, query_pre_attn_scalar 168): llama.cpp
    # only uses 1/sqrt(168) when it sees exactly 62 layers
    big = dict(hidden_size=5376, num_attention_heads=32, head_dim=128, query_pre_attn_scalar=168)
    check_gguf_quant("f16", _gemma3_config(62, **big))
    with pytest.raises(UsageError, match="query_pre_attn_scalar") as err:
        check_gguf_quant("f16", _gemma3_config(62, drop=tuple(range(12, 24)), **big))
    assert "1/sqrt(128)" in err.value.what and "62" in err.value.fix
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        check_gguf_quant("f16", _gemma3_config(final_logit_softcapping=30.0))


@pytest.mark.slow
def test_llava_text_parity_and_upstream_clip_bug_is_caught(tmp_path):
    """LLaVA text matches; image features cannot, because this llama.cpp build puts CLIP's
    class token last in its llava graph. Verification must say so, not pass silently."""
    from edgevlm.export.gguf_export import export_gguf
    from edgevlm.loader import load
    from edgevlm.runtimes import llamacpp_runner as llamacpp

    art = export_gguf(_tiny_dir("llava"), tmp_path, quant="f32", mmproj_type="f32",
                      verify=False, progress=False)
    vlm = load(str(_tiny_dir("llava")))
    ids = vlm.processor.tokenizer("What shape is in the image? A red circle.",
                                  add_special_tokens=False).input_ids
    import torch

    with torch.no_grad():
        ref = vlm.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = llamacpp.open_text(tmp_path / art.file("text_model").path)
    assert np.abs(llamacpp.text_logits(llm, ids) - ref).max() < 1e-3
    with pytest.raises(VerificationError, match="class token"):
        export_gguf(_tiny_dir("llava"), tmp_path / "v", quant="f32", mmproj_type="f32",
                    progress=False, gen_tokens=4)
    assert not list((tmp_path / "v" / "gguf").glob("*.gguf"))  # failed export keeps nothing


STOCK_PROMPT = "What shape is in the image?"


def _stock_chat(out, art, *, side: int, max_tokens: int) -> tuple[dict, object]:
    """llama-cpp-python's stock chat API on an export (MTMDChatHandler, image as a data URL,
    greedy): (reply, the picture sent)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler
    from PIL import Image

    image = Image.new("RGB", (side, side), (200, 30, 90))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = MTMDChatHandler(clip_model_path=str(out / art.file("mmproj").path),
                              verbose=False, use_gpu=False)
    llm = Llama(model_path=str(out / art.file("text_model").path), chat_handler=handler,
                n_ctx=512, n_threads=1, verbose=False)
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": STOCK_PROMPT}]}], max_tokens=max_tokens, temperature=0.0)
    return reply, image


def _assert_stock_chat_agrees(out, art, reply, image, max_tokens: int, vlm=None) -> None:
    """The stock API's answer is the edgevlm runner's (same GGUF chat template, mtmd, F16 KV
    cache, EOS honoured), whose tokens agree with PyTorch by the verifier's criterion."""
    got = _runner_against_pytorch(out, art, prompt=STOCK_PROMPT, image=image, kv_f32=False,
                                  max_tokens=max_tokens, ignore_eos=False, vlm=vlm)
    trace = got["trace"]
    assert got["shortfall"] <= got["bound"], (got, trace.tokens)
    # llama-cpp-python drops undecodable bytes where the runner writes U+FFFD
    assert reply["choices"][0]["message"]["content"] == trace.text.replace("\ufffd", ""), (
        reply, trace)
    assert reply["usage"]["completion_tokens"] == len(trace.tokens)


@pytest.mark.slow
def test_stock_chat_api_with_image_data_url(tmp_path):
    from edgevlm.export.gguf_export import export_gguf

    art = export_gguf(_tiny_dir("llava"), tmp_path, quant="f16", verify=False, progress=False)
    reply, image = _stock_chat(tmp_path, art, side=32, max_tokens=8)
    assert reply["usage"]["prompt_tokens"] > 16  # the 16 image tokens went in
    # this llama.cpp build's LLaVA image features are wrong: PyTorch gets llama.cpp's
    _assert_stock_chat_agrees(tmp_path, art, reply, image, 8,
                              vlm=_with_llama_cpp_features(tmp_path, art, image))


@pytest.mark.slow
@pytest.mark.parametrize("f32_export", [
    "qwen2-vl", "qwen2.5-vl",
    # Measured: the stock handler's 3rd greedy token on tiny Gemma 3 is 0.056 (scaled) below
    # PyTorch's best, where edgevlm's runner on the same files picks PyTorch's own tokens
    # (F16 or F32 KV). The cause, in llama-cpp-python's handler, is not identified.
    pytest.param("gemma3", marks=pytest.mark.xfail(
        strict=True, reason="llama-cpp-python's stock chat diverges from PyTorch on Gemma 3"))],
    indirect=True)
def test_stock_chat_api_on_verified_exports(f32_export):
    """M-RoPE (Qwen) and non-causal image tokens (Gemma 3) through the stock chat handler:
    its answer is the runner's, which agrees with PyTorch."""
    family, out, art = f32_export
    side = art.io.gguf["image"].get("image_size") if family == "gemma3" else 224
    reply, image = _stock_chat(out, art, side=side, max_tokens=4)
    assert reply["usage"]["completion_tokens"] > 0
    _assert_stock_chat_agrees(out, art, reply, image, 4)


@pytest.mark.slow
@pytest.mark.parametrize("f32_export", ["smolvlm"], indirect=True)
def test_context_holds_the_longest_sequence_and_overflow_quotes_llama_log(f32_export):
    """Verification contexts are sized from what is fed (a full-size SmolVLM image is 1088+
    tokens, more than the old fixed 1024); when llama.cpp itself fails, the error quotes its
    own last log lines, never "see the log"."""
    from edgevlm.errors import EdgeVLMError
    from edgevlm.runtimes import llamacpp_runner as llamacpp

    _family, out, art = f32_export
    path = out / art.file("text_model").path
    n = 1100
    llm = llamacpp.open_text(path, n_ctx=llamacpp.context_size(n))
    decoder = llamacpp.Decoder(llm)
    decoder.tokens([5] * (n - 16))
    for _ in range(16):  # the greedy steps after the prompt
        decoder.tokens([5])
    assert decoder.n_past == n and np.isfinite(decoder.last_logits()).all()
    del llm
    small = llamacpp.open_text(path, n_ctx=llamacpp.context_size(300))
    decoder = llamacpp.Decoder(small)
    decoder.tokens([5] * 400)
    decoder.n_ctx = 10**6  # past the length guard: llama.cpp's own failure (no KV slot)
    with pytest.raises(EdgeVLMError, match="llama_decode failed") as err:
        decoder.tokens([5] * 200)
    assert "last log lines" in err.value.what and "see the log" not in str(err.value)


# Run in a child process: without the guard, llama_decode's GGML_ASSERT(n_tokens_all <= n_batch)
# aborts the interpreter (SIGABRT), which must fail this test, not kill the test session.
_OVERFLOW = """
import sys
from edgevlm.errors import EdgeVLMError
from edgevlm.runtimes import llamacpp_runner as llamacpp
llm = llamacpp.open_text(sys.argv[1], n_ctx=256)
for name, feed in [("tokens", lambda: llamacpp.Decoder(llm).tokens([5] * 300)),
                   ("embeddings", lambda: llamacpp.Decoder(llm).embeddings(
                       __import__("numpy").zeros((300, llm.n_embd()), "float32"))),
                   ("text_logits", lambda: llamacpp.text_logits(llm, [5] * 300))]:
    try:
        feed()
        print(name, "NO ERROR")
    except EdgeVLMError as exc:
        print(name, "REFUSED", exc.what)
"""


@pytest.mark.slow
@pytest.mark.parametrize("f32_export", ["smolvlm"], indirect=True)
def test_sequence_longer_than_context_is_refused_not_aborted(f32_export, tmp_path):
    """300 tokens into a 256-token context: a clear edgevlm error for token runs, image
    embeddings and text logits (without the guard the first one aborts Python inside
    llama.cpp, the last one raises llama-cpp-python's bare RuntimeError); the runner refuses
    a prompt longer than its context, and an answer that reaches the end of it."""
    import subprocess
    import sys

    from edgevlm.devices import get_profile
    from edgevlm.runtimes.bench import bench_image, make_runner

    _family, out, art = f32_export
    path = out / art.file("text_model").path
    run = subprocess.run([sys.executable, "-c", _OVERFLOW, str(path)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"rc {run.returncode}: {run.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line)
    assert set(lines) == {"tokens", "embeddings", "text_logits"}, run.stdout
    for name, said in lines.items():
        assert said.startswith("REFUSED") and "256-token llama.cpp context" in said, (name, said)

    art.save(out / "manifest.json")
    runner, _, _ = make_runner(out, get_profile("laptop-x86"))
    runner.n_ctx = 256
    runner.load()
    try:
        with pytest.raises(UsageError, match=r"more than this 256-token llama.cpp context"):
            runner.generate(bench_image((200, 150)), "word " * 300, max_tokens=4)
        with pytest.raises(UsageError, match=r"end of the 256-token llama.cpp context"):
            runner.generate(bench_image((200, 150)), "word " * 40, max_tokens=400,
                            ignore_eos=True)
    finally:
        runner.close()


def test_check_gguf_quant_rejects_bad_input():
    from edgevlm.export.gguf_export import GGUF_QUANTS, check_gguf_quant
    from edgevlm.export.gguf_export.source import read_config

    cfg = read_config(_tiny_dir("smolvlm"))
    with pytest.raises(UsageError, match="q4_k_m") as err:
        check_gguf_quant("q7_x", cfg)
    assert "unknown GGUF quant" in str(err.value)
    check_gguf_quant("q4_k_m", cfg)  # hidden 64: llama.cpp falls back per tensor (reported)
    check_gguf_quant("q4_k_m", read_config(_tiny_dir("smolvlm-k256")))
    check_gguf_quant("Q8_0", cfg)
    with pytest.raises(UsageError, match="mmproj"):
        check_gguf_quant("f16", cfg, mmproj_type="q4_k")
    check_gguf_quant("q4_k_m")  # names only, before any model is loaded
    with pytest.raises(UsageError, match="mmproj"):
        check_gguf_quant("q8_0", None, mmproj_type="q5")
    qwen25 = read_config(_tiny_dir("qwen2.5-vl"))
    check_gguf_quant("f16", qwen25)
    qwen25["vision_config"] = dict(qwen25["vision_config"], window_size=56)
    with pytest.raises(UnsupportedModelError, match="window_size 56"):
        check_gguf_quant("f16", qwen25)
    with pytest.raises(UnsupportedModelError, match="mistral3"):
        check_gguf_quant("f16", {**cfg, "model_type": "mistral3"})
    assert {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"} <= set(GGUF_QUANTS)
    assert GGUF_QUANTS["q4_k_m"].method == "llama.cpp" and GGUF_QUANTS["q8_0"].method == "numpy"


def test_interrupted_write_leaves_no_file(tmp_path):
    from edgevlm.export.gguf_export.writer import TensorJob, write_gguf

    def boom():
        raise KeyboardInterrupt

    jobs = [TensorJob("a.weight", (4, 32), lambda: np.zeros((4, 32), np.float32)),
            TensorJob("b.weight", (4, 32), boom)]
    with pytest.raises(KeyboardInterrupt):
        write_gguf(tmp_path / "x.gguf", "llama", lambda w: None, jobs, "F32", 1)
    assert list(tmp_path.iterdir()) == []


def test_llama_rotary_permutation_matches_interleaved_layout():
    from edgevlm.export.gguf_export.text import permute_rows

    head_dim, n_head = 8, 2
    w = np.arange(n_head * head_dim, dtype=np.float32)[:, None]
    got = permute_rows(w, n_head)[:, 0]
    # per head: rows (0, 4, 1, 5, 2, 6, 3, 7) — first and second halves interleaved
    assert got[:head_dim].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert got[head_dim:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


def _runner_against_pytorch(out, art, *, prompt: str = "What is in the image?",
                            max_tokens: int = 16, kv_f32: bool = True, ignore_eos: bool = True,
                            image=None, vlm=None) -> dict:
    """`edgevlm run`'s llama.cpp runner on the export, greedy, against PyTorch by the
    verifier's criterion (export/parity.py, as gguf_export/verify.py's runner check): teacher-
    forced along the runner's tokens, PyTorch must rank each pick within the export's logits
    bound of its best (random weights tie logits: exact argmax equality would test float
    noise). The picture (default: the bench image) has a size both preprocessors leave
    untouched, as in verification."""
    from edgevlm.calib import CalibSample
    from edgevlm.devices import get_profile
    from edgevlm.export.gguf_export.verify import native_image, text_rms_eps
    from edgevlm.export.parity import TOLERANCES, runner_shortfall, torch_reference
    from edgevlm.runtimes.bench import bench_image, make_runner

    family = art.io.family
    image = image or native_image(family, {}, art.io.gguf["image"], bench_image((200, 150)))
    art.save(out / "manifest.json")
    runner, _, _ = make_runner(out, get_profile("laptop-x86"))
    runner.kv_f32 = kv_f32
    runner.load()
    try:
        trace = runner.generate(image, prompt, max_tokens=max_tokens, ignore_eos=ignore_eos)
    finally:
        runner.close()
    assert trace.tokens, "the runner generated nothing"
    vlm = vlm or load_tiny(family)
    # This llama.cpp build runs qwen2vl text RMSNorm without epsilon; verification detected it
    # and compares against PyTorch with eps 0 (manifest.parity.reference says so).
    eps = 0.0 if "eps 0" in (art.parity or {}).get("reference", "") else None
    with text_rms_eps(vlm, eps):
        ref = torch_reference(vlm, CalibSample(image=image, prompt=prompt, answer=None,
                                               source="test"), len(trace.tokens))
        shortfall = runner_shortfall(vlm, ref, trace.tokens)
    q = art.quantization
    bound = max([TOLERANCES[q["decoder"]].logits]
                + ([TOLERANCES[q["vision_encoder"]].logits] if q["vision_encoder"] != "f32"
                   else [])
                + ([] if kv_f32 else [TOLERANCES["f16"].logits]))  # llama.cpp's F16 KV cache
    return {"trace": trace, "shortfall": shortfall, "bound": bound, "torch": ref["tokens"]}


def test_llamacpp_runner_greedy_tokens_agree_with_pytorch(f32_export):
    """`edgevlm run`'s llama.cpp runner on every verified family's f32 export: each greedy
    pick is within the f32 logits bound of PyTorch's best, teacher-forced along them."""
    _family, out, art = f32_export
    got = _runner_against_pytorch(out, art)
    trace = got["trace"]
    assert len(trace.tokens) == 16 and trace.image_s > 0 and trace.prompt_tokens > 8
    assert got["shortfall"] <= got["bound"] == 1e-3, (got, trace.tokens)


def _with_llama_cpp_features(out, art, image=None):
    """A copy of tiny:llava whose text model takes llama.cpp's image features (the mmproj run
    by mtmd on `image`, default _runner_against_pytorch's) in place of its own."""
    import torch

    from edgevlm.export.gguf_export.verify import native_image
    from edgevlm.loader import LoadedVLM
    from edgevlm.runtimes import llamacpp_runner as llamacpp
    from edgevlm.runtimes.bench import bench_image

    base = load_tiny("llava")
    vlm = LoadedVLM(model=copy.deepcopy(base.model), processor=base.processor,
                    adapter=base.adapter, name=base.name, path=base.path)
    image = image or native_image("llava", {}, art.io.gguf["image"], bench_image((200, 150)))
    llm = llamacpp.open_text(out / art.file("text_model").path)
    feats = torch.from_numpy(llamacpp.image_embeddings(llm, out / art.file("mmproj").path, image))
    del llm
    seen = {}

    def ids(_m, args, kwargs):
        seen["mask"] = vlm.adapter.visual_mask(kwargs["input_ids"], vlm.config)[0]

    def swap(_m, args, kwargs):
        mask = seen.pop("mask", None)
        if mask is not None and int(mask.sum()) == len(feats):  # the prefill, image included
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"].clone()
            kwargs["inputs_embeds"][0, mask] = feats.to(kwargs["inputs_embeds"].dtype)
        return args, kwargs

    vlm.model.register_forward_pre_hook(ids, with_kwargs=True)
    vlm.adapter.text_stack(vlm.model).register_forward_pre_hook(swap, with_kwargs=True)
    return vlm


def test_llamacpp_runner_answers_for_llava(tmp_path):
    """LLaVA runs too. Its image features are wrong in this llama.cpp build (see above), so
    PyTorch is given llama.cpp's features: the runner's text path (chat template, image
    placement, greedy decode) must then agree with PyTorch by the verifier's criterion."""
    from edgevlm.export.gguf_export import export_gguf

    art = export_gguf(_tiny_dir("llava"), tmp_path, quant="f16", verify=False, progress=False)
    got = _runner_against_pytorch(tmp_path, art, vlm=_with_llama_cpp_features(tmp_path, art))
    assert got["shortfall"] <= got["bound"], (got, got["trace"].tokens)


# --- tokenizer: llama.cpp pre-tokenizer names for real checkpoints' tokenizer.json ----------

HARD_STRINGS = ["  3333 a\n\n\tb 你好 🦙 I'm don't 123456",
                "x=1234567;  y = (a+b)*2 !!!   \n\n\n  end",
                "ÉCOLE d'été: 1990s, 2024-05-01 — ok?\r\n\t\t\tHE'LL WE'VE",
                "数字123和emoji😀😀 spaces     tabs\t\tnewline\n",
                "#tag @user (hello) [world] \"quoted\" $cash HE'S"]
TOKENIZER_CORPUS = [
    "The year 2024 had 366 days; 1234567890 is ten digits, 42 is the answer.",
    "I'm sure you're right, don't worry: we'll see, they've said it'd work. HE'S HERE!",
    "你好，世界！这是一个测试。数字一二三 123。日本語のテキストもあります。",
    "Emoji 🦙🦙 llama 😀 smile 🚀 rocket ✨ sparkles 👍🏽 thumbs.",
    "Whitespace  runs   here\n\n\tand\ttabs    and\r\nCRLF lines\n\n\n  indented code:\n    x = 1",
    "Punctuation!!! ??? ... --- (parens) [brackets] {braces} <angle> @#$%^&*_+=|\\/~`",
    "What shape is in the image? A red circle. Describe the image. Answer briefly.",
    # punctuation glued to words: Qwen2's regex keeps "(the" whole, GPT-2's splits it
    "#tags @users (words) [links] \"quotes\" $cash #tag @user (the) [the]",
]


def _regex_split(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def _real_style_pre_tokenizer(style: str):
    """Pre-tokenizer configured exactly as the real tokenizer.json files have it."""
    from tokenizers import pre_tokenizers

    from edgevlm.export.gguf_export.tokenizer import LLAMA3_REGEX, QWEN2_REGEX

    if style == "smollm":  # HuggingFaceTB/SmolLM2 (SmolVLM's text model)
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if style == "qwen2":  # Qwen2 / Qwen2-VL / Qwen2.5-VL
        return pre_tokenizers.Sequence([
            _regex_split(QWEN2_REGEX),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    if style == "llama3":
        return pre_tokenizers.Sequence([
            _regex_split(LLAMA3_REGEX),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    raise ValueError(style)


def _swap_tokenizer(family: str, style: str, tmp_path):
    """A copy of the tiny checkpoint whose tokenizer.json is a byte-level BPE retrained with a
    real-style pre-tokenizer: same special tokens at the same ids, vocabulary no larger than the
    model's (so the weights still fit)."""
    import json
    import shutil

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    src = _tiny_dir(family)
    folder = tmp_path / f"{family}-{style}"
    shutil.copytree(src, folder)
    old = json.loads((src / "tokenizer.json").read_text())
    specials = [a["content"] for a in sorted(old["added_tokens"], key=lambda a: a["id"])]
    assert [a["id"] for a in sorted(old["added_tokens"], key=lambda a: a["id"])] == list(
        range(len(specials)))
    vocab_size = json.loads((src / "config.json").read_text())["text_config"]["vocab_size"]
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json has it
    tok.pre_tokenizer = _real_style_pre_tokenizer(style)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS * 8, trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size
    assert [tok.token_to_id(s) for s in specials] == list(range(len(specials)))
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("family,style,pre", [("smolvlm", "smollm", "smollm"),
                                              ("qwen2-vl", "qwen2", "qwen2"),
                                              ("smolvlm", "llama3", "llama-bpe")])
def test_pre_tokenizer_detected_from_tokenizer_json(family, style, pre, tmp_path):
    from edgevlm.export.gguf_export.tokenizer import tokenizer_plan

    plan = tokenizer_plan(_swap_tokenizer(family, style, tmp_path))
    assert (plan.model, plan.pre, plan.add_bos, plan.add_eos) == ("gpt2", pre, False, False)
    assert tokenizer_plan(_tiny_dir(family)).pre == "gpt-2"  # the tiny ones: plain ByteLevel


def _assert_strings_tell_pre_tokenizers_apart(folder):
    """The hard strings would tokenize differently under plain GPT-2 pre-tokenization (the
    writer's old "gpt-2" label): the test below can fail on a wrong pre-tokenizer name."""
    from tokenizers import Tokenizer, pre_tokenizers

    real = Tokenizer.from_file(str(folder / "tokenizer.json"))
    gpt2 = Tokenizer.from_file(str(folder / "tokenizer.json"))
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert any(real.encode(t, add_special_tokens=False).ids
               != gpt2.encode(t, add_special_tokens=False).ids for t in HARD_STRINGS)


@pytest.mark.slow
@pytest.mark.parametrize("family,style,pre", [("smolvlm", "smollm", "smollm"),
                                              ("qwen2-vl", "qwen2", "qwen2"),
                                              ("smolvlm", "llama3", "llama-bpe")])
def test_real_style_tokenizer_matches_hf_in_llama_cpp(family, style, pre, tmp_path):
    """Exported with a SmolLM2 / Qwen2-style pre-tokenizer, llama.cpp tokenizes hard strings
    (digit runs, whitespace runs, CJK, emoji, contractions) exactly like Hugging Face, and the
    export's own verification passes."""
    from gguf import GGUFReader
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgevlm.export.gguf_export import export_gguf

    folder = _swap_tokenizer(family, style, tmp_path)
    _assert_strings_tell_pre_tokenizers_apart(folder)
    art = export_gguf(folder, tmp_path / "out", quant="f32", mmproj_type="f32", progress=False,
                      gen_tokens=4)
    assert art.parity["passed"] and art.parity["tokenizer_matches"]
    assert art.io.gguf["tokenizer"]["pre"] == pre
    path = tmp_path / "out" / art.file("text_model").path
    field = GGUFReader(str(path)).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == pre
    hf = AutoTokenizer.from_pretrained(folder)
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, vocab_only=True)
    for text in HARD_STRINGS:
        want = hf(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    # special tokens inside text split out as HF splits them
    text = "<|im_start|>user\n 12 你好<|im_end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(
        text, add_special_tokens=False).input_ids


def _with_tokenizer_json(tmp_path, tok) -> object:
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(_tiny_dir("llava"), folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _spm_unigram():
    """Gemma / T5-style: Unigram model with a Metaspace pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(TOKENIZER_CORPUS * 4, trainer=trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False))
    return tok


def test_sentencepiece_without_scores_refused_before_any_work(tmp_path):
    """A Unigram vocabulary without its tokenizer.model: llama.cpp needs the piece scores that
    only tokenizer.model carries (SentencePiece-BPE files are converted: test_sentencepiece)."""
    from transformers import AutoConfig

    from edgevlm.export.gguf_export import check_gguf_quant, export_gguf

    folder = _with_tokenizer_json(tmp_path, _spm_unigram())
    with pytest.raises(UnsupportedModelError, match="SentencePiece") as err:
        check_gguf_quant("f16", folder)
    assert isinstance(err.value, UsageError) and "tokenizer.model" in err.value.fix
    # the CLI passes the loaded model's config: its folder is found through _name_or_path
    with pytest.raises(UnsupportedModelError, match="SentencePiece"):
        check_gguf_quant("f16", AutoConfig.from_pretrained(folder))
    with pytest.raises(UnsupportedModelError, match="SentencePiece"):
        export_gguf(folder, tmp_path / "out", quant="f32", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unknown_pre_tokenizer_refused_naming_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from edgevlm.export.gguf_export import check_gguf_quant

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        _regex_split(r"\p{N}{1,2}| ?\p{L}+|\s+"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(UnsupportedModelError, match=r"\\p\{N\}\{1,2\}"):
        check_gguf_quant("f16", _with_tokenizer_json(tmp_path, tok))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(UnsupportedModelError, match="add_prefix_space"):
        check_gguf_quant("f16", _with_tokenizer_json(tmp_path / "b", tok))
