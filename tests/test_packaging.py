"""Layout guardrails: the wheel, the torch-free subpackages, no shadowed dependency names."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["edgevlm", "export", "runtimes", "devices"]
DEPENDENCY_NAMES = {"onnx", "onnxruntime", "gguf", "llama_cpp", "torch", "transformers",
                    "numpy", "tokenizers", "safetensors", "onnxruntime_genai", "PIL"}


def _sources():
    for folder in FOLDERS + ["tests", "benchmarks"]:
        yield from (ROOT / folder).rglob("*.py")


def test_wheel_contains_only_edgevlm(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("edgevlm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edgevlm", next(t for t in tops if t.endswith(".dist-info"))}
    for sub in ("edgevlm/export/__init__.py", "edgevlm/runtimes/__init__.py",
                "edgevlm/devices/__init__.py"):
        assert sub in names
    assert any(n.startswith("edgevlm/devices/profiles/") and n.endswith(".toml") for n in names)


def test_no_top_level_imports_of_subpackage_folders():
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"export", "runtimes", "devices"}, (path, name)


def test_no_module_shadows_a_dependency():
    for path in _sources():
        assert path.stem not in DEPENDENCY_NAMES, path


def test_runtimes_and_devices_import_without_torch():
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers'): sys.modules[m] = None\n"
        "import importlib, pkgutil\n"
        "import edgevlm.runtimes, edgevlm.devices\n"
        "for pkg in (edgevlm.runtimes, edgevlm.devices):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
