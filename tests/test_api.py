"""The Python API (edgevlm.api): every stage exposed with a docstring, typed export configs,
and the README's "Python API" example run exactly as written. (That `import edgevlm` needs
no torch is checked in test_packaging.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["load", "calibration", "score", "make_plan", "prune_", "export", "verify", "bench"]


def readme_example() -> str:
    """The first ```python block under the README's '## Python API' heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's Python API section"
    return match.group(1)


def test_api_exposes_every_stage_with_a_docstring():
    import edgevlm

    for name in STAGES + ["run", "OnnxExport", "GgufExport"]:
        assert name in dir(edgevlm) and name in edgevlm.__all__, name
        assert (getattr(edgevlm, name).__doc__ or "").strip(), name
    with pytest.raises(AttributeError):
        edgevlm.no_such_stage  # noqa: B018


def test_export_configs_round_trip_through_json():
    from edgevlm.api import GgufExport, OnnxExport, _ExportConfig
    from edgevlm.errors import UsageError

    for config in (OnnxExport(quant="int8", vision_quant="int8"),
                   GgufExport(quant="q4_k_m", name="m")):
        text = config.to_json()
        assert type(config).from_json(text) == config
        assert _ExportConfig.from_json(text) == config  # the target picks the class
    with pytest.raises(UsageError, match="target 'gguf'"):
        OnnxExport.from_json(GgufExport().to_json())
    with pytest.raises(UsageError, match="unknown keys"):
        OnnxExport.from_json('{"target": "onnx", "mmproj_type": "f16"}')


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's example, unchanged, from a fresh folder: score, plan, prune, export to
    ONNX (verified), verify, run and bench the export."""
    import torch

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md:Python API", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "removed [" in out and "answer" in out and "TTFT ms" in out
    assert "held-out sample(s): " in out and "logits" in out  # the recorded checks
    assert (tmp_path / "out/api/pruned/config.json").exists()
    assert (tmp_path / "out/api/onnx/manifest.json").exists()
    import json

    from edgevlm.loader import load

    pruned = load(str(tmp_path / "out/api/pruned"))
    assert pruned.adapter.num_layers(pruned.config) == 6  # tiny:smolvlm has 8; 25% removed
    exported = json.loads((tmp_path / "out/api/onnx/onnx/config.json").read_text())
    assert exported["text_config"]["num_hidden_layers"] == 6  # the pruned model went out
