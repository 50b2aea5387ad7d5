"""Issue 13 item 3: one manifest schema, versioned. The plan is a PrunePlan on every path (and
config.json's `edgevlm_plan` is the same), `io` is typed and is what the runners read, and a
manifest from an older edgevlm gets one clear error."""

from __future__ import annotations

import json

import pytest

from edgevlm.cli import main
from edgevlm.errors import UsageError
from edgevlm.plan import plan_from_config
from edgevlm.types import MANIFEST_SCHEMA, ExportArtifact, ExportIO, FileEntry, PrunePlan

# A manifest as edgevlm wrote it before the schema was versioned (schema 1): plan in the
# config-record shape, untyped io, quantization keys of its own per target.
OLD_MANIFEST = {
    "target": "gguf", "base_model": "tiny:smolvlm", "family": "smolvlm",
    "files": [{"role": "text_model", "path": "gguf/x-f16.gguf", "sha256": "0" * 64,
               "bytes": 1, "dtype": "f16"}],
    "plan": {"method": "bi", "ratio": 0.25, "original_layers": 8, "dropped": [2, 5],
             "kept": [0, 1, 3, 4, 6, 7], "protected": []},
    "quantization": {"text": "f16", "mmproj": "f16"},
    "io": {"text_arch": "llama", "n_layers": 6, "image_token_id": 49190},
    "versions": {}, "parity": {}, "schema_version": 1, "extra": {},
}


def _artifact() -> ExportArtifact:
    io = ExportIO(family="smolvlm", image_token_id=49190, image_token="<image>", num_layers=6,
                  hidden_size=64, vocab_size=49280,
                  files={"decoder": {"none": "onnx/onnx/decoder_model_merged.onnx",
                                     "q4": "onnx/onnx/decoder_model_merged_q4.onnx"}},
                  graphs={"decoder": {"num_kv_heads": 1, "head_dim": 16}})
    plan = PrunePlan(method="bi", n_layers=8, layers=[2, 5], ratio=0.25, scores=[0.5] * 8)
    return ExportArtifact(target="onnx", base_model="tiny:smolvlm", io=io, plan=plan,
                          files=[FileEntry("decoder", "onnx/onnx/decoder_model_merged.onnx",
                                           "0" * 64, 1, "float32")],
                          quantization={"decoder": "q4", "vision_encoder": "none"})


def test_manifest_round_trips_with_typed_plan_and_io(tmp_path):
    art = _artifact()
    art.save(tmp_path / "manifest.json")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema_version"] == MANIFEST_SCHEMA
    assert data["plan"] == art.plan.to_dict()  # PrunePlan's JSON form, nothing else
    assert "family" not in data  # one place: io.family
    back = ExportArtifact.load(tmp_path / "manifest.json")
    assert back == art and isinstance(back.io, ExportIO) and isinstance(back.plan, PrunePlan)
    assert back.io.path("decoder", "q4").endswith("_q4.onnx")
    with pytest.raises(UsageError, match="(?s)no decoder file at precision 'int8'.*none, q4"):
        back.io.path("decoder", "int8")


@pytest.mark.parametrize("version", [1, None])
def test_older_manifest_is_refused_in_one_line(version, tmp_path, capsys):
    old = dict(OLD_MANIFEST)
    if version is None:
        old.pop("schema_version")
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    image = tmp_path / "red.png"
    _image().save(image)
    for argv in (["run", str(tmp_path), "--image", str(image)], ["bench", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'manifest.json'} was made by an older edgevlm (manifest schema " \
               f"{version or 'none'}, this version reads {MANIFEST_SCHEMA})" in err
        assert "re-export it with `edgevlm export --model tiny:smolvlm --target gguf" in err
        assert "Traceback" not in err


def test_newer_manifest_asks_for_an_upgrade(tmp_path):
    data = _artifact().to_dict()
    data["schema_version"] = MANIFEST_SCHEMA + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="newer than this edgevlm"):
        ExportArtifact.load(tmp_path / "manifest.json")


def test_plan_from_config_reads_every_record_as_a_prune_plan():
    plan = PrunePlan(method="bi", n_layers=8, layers=[2, 5], ratio=0.25)
    assert plan_from_config({"edgevlm_plan": plan.to_dict()}) == plan
    assert plan_from_config({"text_config": {"num_hidden_layers": 8}}) is None
    frozen = PrunePlan(method="lc", n_layers=8, layers=[1, 3], mode="freeze", ratio=0.25)
    assert plan_from_config({"edgevlm_freeze": frozen.to_dict()}) == frozen
    tower = PrunePlan(method="bi", n_layers=4, layers=[1, 2], ratio=0.5)
    vision = plan_from_config({"text_config": {"num_hidden_layers": 8},
                               "edgevlm_vision_plan": tower.to_dict()})
    assert vision.layers == [] and vision.n_layers == 8 and vision.vision == tower.to_dict()
    # Records of an older edgevlm (its own keys) are refused, whichever key holds them.
    for key, record in (("edgevlm_plan", OLD_MANIFEST["plan"]),
                        ("edgevlm_freeze", {"layers": [1, 3], "n_layers": 8, "tokens": "visual"}),
                        ("edgevlm_vision_plan", {"original_layers": 4, "dropped": [1, 2]})):
        with pytest.raises(UsageError, match=f"{key} was written by an older edgevlm"):
            plan_from_config({"text_config": {"num_hidden_layers": 8}, key: record})


def test_plan_is_one_schema_on_every_export_path(tmp_path, capsys):
    """`export --method` (prunes, then exports) and `export` of a checkpoint `prune` made:
    plan.json, config.json's edgevlm_plan and manifest.plan are the same PrunePlan."""
    args = ["--calib", "builtin:8", "--method", "bi", "--ratio", "0.25"]
    assert main(["-q", "prune", "tiny:smolvlm", *args, "-o", str(tmp_path / "p")]) == 0
    assert main(["-q", "export", "--model", str(tmp_path / "p" / "pruned"), "--target", "gguf",
                 "--no-verify", "-o", str(tmp_path / "a")]) == 0
    assert main(["-q", "export", "--model", "tiny:smolvlm", *args, "--target", "gguf",
                 "--no-verify", "-o", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    for folder in (tmp_path / "p", tmp_path / "b"):
        config = json.loads((folder / "pruned" / "config.json").read_text())
        assert config["edgevlm_plan"] == plan
    for out in ("a", "b"):
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert manifest["plan"] == plan
        assert manifest["io"]["num_layers"] == 6 and manifest["quantization"]["decoder"] == "f16"


@pytest.mark.slow
def test_runners_read_io_not_config(tmp_path):
    """The ONNX runner takes the image token from manifest.io (config.json's is ignored), the
    llama.cpp runner its files: change io and they follow it."""
    from edgevlm.export.onnx_export import export_onnx
    from edgevlm.loader import materialize_tiny
    from edgevlm.runtimes.ort_generate import OnnxVLM

    root = tmp_path / "onnx-export"
    export_onnx(materialize_tiny("tiny:smolvlm"), root, verify=False, progress=False)
    config_path = root / "onnx" / "config.json"
    config = json.loads(config_path.read_text())
    right = config["image_token_id"]
    config["image_token_id"] = 0
    config_path.write_text(json.dumps(config))
    assert OnnxVLM(root / "onnx").image_token_id == right
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["io"]["image_token_id"] = 7
    manifest["io"]["family"] = "llava"
    (root / "manifest.json").write_text(json.dumps(manifest))
    runner = OnnxVLM(root / "onnx")
    assert (runner.image_token_id, runner.family) == (7, "llava")


@pytest.mark.slow
def test_llamacpp_runner_opens_the_files_io_names(tmp_path):
    """files[] (hashes) untouched, io's text model pointed at the mmproj: the runner follows
    io and llama.cpp refuses the projector as a text model."""
    from edgevlm.devices import get_profile
    from edgevlm.export.gguf_export import export_gguf
    from edgevlm.loader import materialize_tiny
    from edgevlm.runtimes.bench import bench_image, make_runner

    root = tmp_path / "gguf-export"
    art = export_gguf(materialize_tiny("tiny:smolvlm"), root, quant="f16", verify=False,
                      progress=False)
    runner, _, _ = make_runner(root, get_profile("laptop-x86"))
    runner.load()
    try:
        assert len(runner.generate(bench_image(), "What colour?", max_tokens=2).tokens) == 2
    finally:
        runner.close()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["io"]["files"]["text_model"] = {"f16": art.io.path("mmproj")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    runner, _, _ = make_runner(root, get_profile("laptop-x86"))
    with pytest.raises(Exception, match="(?i)mmproj|load"):
        runner.load()


def _image():
    from edgevlm.runtimes.bench import bench_image

    return bench_image()
