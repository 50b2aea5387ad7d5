"""Issue 6: runners driven by manifest.json, bench, and their bad inputs (llama.cpp side)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from edgevlm.cli import main
from edgevlm.devices import get_profile
from edgevlm.errors import MissingDependencyError, UsageError
from edgevlm.runtimes.artifact import open_export
from edgevlm.runtimes.bench import BenchConfig, bench, bench_image, make_runner
from edgevlm.runtimes.measure import RssSampler, peak_rss_mb
from edgevlm.runtimes.sampling import TextStream, sample_next
from edgevlm.types import BenchResult

LAPTOP = get_profile("laptop-x86")


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory):
    from edgevlm.export.gguf_export import export_gguf
    from edgevlm.loader import materialize_tiny

    root = tmp_path_factory.mktemp("gguf")
    artifact = export_gguf(materialize_tiny("tiny:smolvlm"), root, quant="f16", progress=False)
    artifact.save(root / "manifest.json")
    return root


@pytest.fixture
def export_copy(gguf_export, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(gguf_export, dst)
    return dst


def test_llamacpp_runner_answers_with_an_image(gguf_export):
    runner, artifact, _ = make_runner(gguf_export, LAPTOP)
    runner.load()
    pieces = []
    trace = runner.generate(bench_image((320, 200)), "What is in the image?", max_tokens=12,
                            on_text=pieces.append)
    assert 1 <= len(trace.tokens) <= 12 and trace.stop in ("eos", "max_tokens")
    assert "".join(pieces) == trace.text
    assert trace.prompt_tokens > 20  # text plus the image's tiles
    assert trace.image_s > 0 and trace.prefill_s > 0 and trace.ttft_s > trace.image_s
    again = runner.generate(bench_image((320, 200)), "What is in the image?", max_tokens=12)
    assert again.tokens == trace.tokens  # greedy is deterministic
    forced = runner.generate(bench_image((320, 200)), "What is in the image?", max_tokens=20,
                             ignore_eos=True)
    assert len(forced.tokens) == 20 and forced.decode_tok_s > 0
    runner.close()


def test_llamacpp_runner_tokens_agree_with_pytorch(gguf_export):
    """The default runner (llama.cpp's F16 KV cache) on the f16 export: PyTorch, teacher-forced
    along its greedy tokens, ranks each within f16's logits bound of its best (the verifier's
    criterion, export/parity.py), on a picture both preprocessors leave untouched."""
    from test_gguf_export import _runner_against_pytorch

    from edgevlm.types import ExportArtifact

    art = ExportArtifact.load(gguf_export / "manifest.json")
    got = _runner_against_pytorch(gguf_export, art, kv_f32=False)
    assert len(got["trace"].tokens) == 16
    assert got["shortfall"] <= got["bound"] == 1e-2, (got, got["trace"].tokens)


def test_bench_fills_every_field(gguf_export):
    result = bench(gguf_export, BenchConfig(runs=2, warmup=1, gen_tokens=8), profile=LAPTOP)
    data = json.loads(json.dumps(result.to_dict()))
    assert BenchResult.from_dict(data) == result
    assert result.load_s > 0 and len(result.runs) == 2
    for key in ("image_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s"):
        assert result.summary[key]["median"] > 0, key
    assert result.peak_rss_mb > 0
    assert result.peak_ram_mb is None and result.power_w is None  # no tegrastats here
    assert result.export["decoder_layers"] == 8 and result.runtime == "llama.cpp"


def test_decode_at_context_uses_the_runners_decoder(gguf_export):
    """bench_footprint's decode after N cached tokens drives the runner's own Decoder."""
    from edgevlm.runtimes.bench import decode_at

    runner, _, _ = make_runner(gguf_export, LAPTOP)
    runner.load()
    out = decode_at(runner, 24, 4)
    runner.close()
    assert out["context"] == 24 and out["tokens"] == 4 and out["decode_tok_s"] > 0


def test_cli_run_and_bench(gguf_export, tmp_path, capsys):
    image = tmp_path / "img.png"
    bench_image((200, 150)).save(image)
    assert main(["run", str(gguf_export), "--image", str(image), "--max-tokens", "4",
                 "--device", "laptop-x86"]) == 0
    out = tmp_path / "bench.json"
    chart = tmp_path / "bench.png"
    assert main(["-q", "bench", str(gguf_export), str(gguf_export / "manifest.json"),
                 "--runs", "1", "--warmup", "0", "--gen-tokens", "4", "-o", str(out),
                 "--plot", str(chart)]) == 0
    table = capsys.readouterr().out
    assert "tg tok/s" in table and " vs " in table
    assert len(json.loads(out.read_text())["results"]) == 2
    assert chart.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, match", [
    (["--device", "orin-nanoo"], "jetson-orin-nano"),
    (["--image", "/nonexistent.png"], "not found"),
])
def test_cli_run_bad_inputs(gguf_export, tmp_path, capsys, args, match):
    image = tmp_path / "img.png"
    bench_image((64, 64)).save(image)
    argv = ["run", str(gguf_export), "--image", str(image), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_unreadable_image(gguf_export, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["run", str(gguf_export), "--image", str(bad)]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_tampered_file_is_refused_before_loading(export_copy):
    artifact, _ = open_export(export_copy)
    target = export_copy / artifact.file("text_model").path
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    target.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="sha256"):
        make_runner(export_copy, LAPTOP)


def test_truncated_or_missing_files_are_refused(export_copy):
    artifact, _ = open_export(export_copy)
    mmproj = export_copy / artifact.file("mmproj").path
    mmproj.write_bytes(mmproj.read_bytes()[:100])
    with pytest.raises(UsageError, match="truncated"):
        open_export(export_copy)
    mmproj.unlink()
    with pytest.raises(UsageError, match="missing"):
        open_export(export_copy)


def test_manifest_missing_or_newer(export_copy, tmp_path):
    with pytest.raises(UsageError, match="no manifest"):
        open_export(tmp_path)
    data = json.loads((export_copy / "manifest.json").read_text())
    data["schema_version"] = 99
    (export_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="newer"):
        open_export(export_copy)


def test_missing_runtime_package_names_the_install_command(gguf_export, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(MissingDependencyError) as info:
        make_runner(gguf_export, get_profile("jetson-orin-nano"))
    assert "GGML_CUDA" in str(info.value)
    assert main(["bench", str(gguf_export), "--device", "laptop-x86"]) == 3
    assert "pip install" in capsys.readouterr().err


def test_sampling():
    logits = np.array([0.1, 3.0, 0.5, 2.9], dtype=np.float32)
    assert sample_next(logits) == 1
    assert sample_next(logits, temperature=1.0, top_p=0.01, rng=np.random.default_rng(0)) == 1
    draws = {sample_next(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(40)}
    assert draws > {1, 3}
    a = [sample_next(logits, 0.8, 0.9, np.random.default_rng(7)) for _ in range(3)]
    assert a == [sample_next(logits, 0.8, 0.9, np.random.default_rng(7)) for _ in range(3)]


def test_text_stream_holds_back_partial_utf8():
    pieces = {1: "é".encode()[:1], 2: "é".encode()[1:], 3: b"!"}
    stream = TextStream(lambda ids: b"".join(pieces[i] for i in ids))
    assert [stream.push(1), stream.push(2), stream.push(3)] == ["", "é", "!"]


def test_rss_sampler_sees_an_allocation():
    with RssSampler(interval=0.005) as rss:
        block = np.ones(40_000_000 // 8)
        block.sum()
    assert rss.peak_mb is not None and rss.peak_mb > 40
    assert peak_rss_mb() >= rss.peak_mb * 0.5


def test_run_and_bench_need_no_torch(gguf_export):
    """What a device runs: the CLI's run and bench with torch and transformers absent."""
    import subprocess

    code = (
        "import sys\n"
        "for m in ('torch', 'transformers'): sys.modules[m] = None\n"
        "from edgevlm.cli import main\n"
        f"assert main(['run', {str(gguf_export)!r}, '--image', 'builtin', '--max-tokens', '3']) == 0\n"
        f"assert main(['-q', 'bench', {str(gguf_export)!r}, '--runs', '1', '--warmup', '0',"
        " '--gen-tokens', '3']) == 0\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tg tok/s" in out.stdout
