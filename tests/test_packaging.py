"""Layout and packaging guardrails: the wheel, its declared requirements (ranges in
pyproject.toml, exact pins only in constraints.txt, a device install without torch), the
torch-free subpackages, no shadowed dependency names. All offline: metadata comes from a
locally built wheel and the installed distributions."""

from __future__ import annotations

import ast
import email.parser
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["edgevlm", "export", "runtimes", "devices"]
DEPENDENCY_NAMES = {"onnx", "onnxruntime", "gguf", "llama_cpp", "torch", "transformers",
                    "numpy", "tokenizers", "safetensors", "onnxruntime_genai", "PIL"}


def _sources():
    for folder in FOLDERS + ["tests", "benchmarks"]:
        yield from (ROOT / folder).rglob("*.py")


HEAVY = {"torch", "transformers", "torchvision", "accelerate", "peft", "safetensors"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """edgevlm's wheel, built from this tree without network or build isolation."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True)
    return next(out.glob("edgevlm-*.whl"))


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def _extra_closure(requirements: list[Requirement], extras: set[str]) -> dict[str, Requirement]:
    """edgevlm's own requirements for `extras` (following edgevlm[...] self-references),
    by canonical name."""
    out, todo, seen = {}, set(extras), set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for req in requirements:
            if req.marker and not req.marker.evaluate({"extra": extra}):
                continue
            if canonicalize_name(req.name) == "edgevlm":
                todo |= set(req.extras) - seen
            else:
                out[canonicalize_name(req.name)] = req
    return out


def _installed_closure(names) -> set[str]:
    """Every distribution the installed metadata says `names` pull in (no extras)."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_device_install_never_pulls_torch(wheel):
    """`pip install "edgevlm[runtime]" onnxruntime` (or llama-cpp-python): neither edgevlm's
    runtime extra nor what those runtimes require (their installed metadata) is torch."""
    requirements = _wheel_requirements(wheel)
    base = _extra_closure(requirements, {""})
    runtime = _extra_closure(requirements, {"runtime"})
    assert set(runtime) >= {"numpy", "pillow", "tokenizers", "jinja2"}
    assert not (set(base) | set(runtime)) & HEAVY, runtime
    device = _installed_closure([*base, *runtime, "onnxruntime", "llama-cpp-python"])
    assert not device & HEAVY, device & HEAVY
    # ...while the model-side extras do bring it
    assert {"torch", "transformers"} <= set(_extra_closure(requirements, {"onnx"}))
    assert {"torch", "transformers"} <= set(_extra_closure(requirements, {"gguf"}))


def _declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, list[Requirement]] = {}
    for text in project["dependencies"] + [r for reqs in project["optional-dependencies"].values()
                                           for r in reqs]:
        req = Requirement(text)
        out.setdefault(canonicalize_name(req.name), []).append(req)
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_pyproject_declares_ranges_not_pins():
    for reqs in _declared().values():
        for req in reqs:
            assert not any(s.operator in ("==", "===") for s in req.specifier), (
                f"{req}: exact pins belong in constraints.txt")
    declared = _declared()
    for name in ("torch", "transformers"):
        assert any(s.operator == ">=" for r in declared[name] for s in r.specifier), name


def test_every_pin_lies_inside_the_declared_range():
    declared, pins = _declared(), _pins()
    assert {"torch", "transformers", "onnx", "onnxruntime", "gguf", "llama-cpp-python"} <= set(pins)
    for name, version in pins.items():
        assert name in declared, f"constraints.txt pins {name}, which pyproject.toml never declares"
        for req in declared[name]:
            assert req.specifier.contains(version, prereleases=True), (
                f"constraints.txt pins {name}=={version} outside pyproject.toml's {req}")


def test_wheel_metadata_matches_pyproject(wheel):
    """The built metadata carries the declared ranges (no stale egg-info pins)."""
    built = {canonicalize_name(r.name): str(r.specifier) for r in _wheel_requirements(wheel)
             if canonicalize_name(r.name) != "edgevlm"}
    for name, reqs in _declared().items():
        if name != "edgevlm":
            assert built[name] in {str(r.specifier) for r in reqs}, name


def test_wheel_contains_only_edgevlm(wheel):
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
    """A device install has no torch: edgevlm, its Python API module, and every module of
    edgevlm.runtimes and edgevlm.devices import without it."""
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers'): sys.modules[m] = None\n"
        "import importlib, pkgutil\n"
        "import edgevlm, edgevlm.api\n"
        "assert callable(edgevlm.bench) and callable(edgevlm.run) and edgevlm.OnnxExport\n"
        "import edgevlm.runtimes, edgevlm.devices\n"
        "for pkg in (edgevlm.runtimes, edgevlm.devices):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
