"""The Python API: the CLI's stages as functions (`import edgevlm`).

    import edgevlm

    vlm = edgevlm.load("tiny:smolvlm")
    calib = edgevlm.calibration("builtin:8")
    scores = edgevlm.score(vlm, calib, "bi")
    plan = edgevlm.make_plan(vlm, scores, ratio=0.25)
    edgevlm.prune_(vlm, plan, "out/pruned")
    manifest = edgevlm.export(vlm, "out/onnx", edgevlm.OnnxExport(quant="none"), calib=calib)
    print(edgevlm.run("out/onnx", "What colour is the shape?", max_tokens=8))
    print(edgevlm.bench("out/onnx", runs=2, gen_tokens=8).to_dict())

Each function is a thin wrapper over the code the CLI runs (edgevlm.loader,
edgevlm.pipeline, edgevlm.prune, edgevlm.targets, edgevlm.runtimes.bench). This module
imports nothing heavy at import time: torch and transformers load on the first call that
needs them, so `import edgevlm` works on a device install without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.errors import UsageError
from edgevlm.loader import DEFAULT_MODEL  # torch-free at import, like this module
from edgevlm.types import JsonMixin

_PLAN_ATTR = "_edgevlm_api_plan"  # the PrunePlan prune_() applied, kept on the nn.Module


# ------------------------------------------------------------------ export configurations
class _ExportConfig(JsonMixin):
    """Shared by the per-target configs: JSON round trip like PrunePlan."""

    target = ""

    def to_json(self) -> str:
        return json.dumps(dict(self.to_dict(), target=self.target), indent=2)

    @classmethod
    def from_json(cls, text: str):
        data = json.loads(text)
        target = data.pop("target", cls.target)
        klass = EXPORT_CONFIGS.get(target) if cls is _ExportConfig else cls
        if klass is None or target != klass.target:
            raise UsageError(f"export config for target '{target}' given to {cls.__name__}",
                             f"use one of: {', '.join(EXPORT_CONFIGS)}")
        return klass.from_dict(data)

    def options(self) -> dict:
        """Keyword arguments for the target's exporter (besides quant)."""
        return {k: v for k, v in self.to_dict().items() if k != "quant"}


@dataclass
class OnnxExport(_ExportConfig):
    """ONNX (onnxruntime / transformers.js): `quant` for the decoder (none|int8|q4),
    `vision_quant` for the vision encoder (none|int8)."""

    quant: str = "none"
    vision_quant: str = "none"
    target = "onnx"


@dataclass
class GgufExport(_ExportConfig):
    """GGUF (llama.cpp): `quant` for the text model (f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|
    q6_k), `mmproj_type` for the projector file, `name` for the file stem (default: the
    model's name plus the plan, as the CLI names it)."""

    quant: str = "f16"
    mmproj_type: str = "f16"
    name: str | None = None
    target = "gguf"


EXPORT_CONFIGS: dict[str, type[_ExportConfig]] = {"onnx": OnnxExport, "gguf": GgufExport}


# ------------------------------------------------------------------------------- stages
def load(model: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
         seed: int = 0, device_map: str | None = None,
         attn_implementation: str | None = None):
    """Load a vision-language model: a hub id, a local checkpoint folder, `tiny:<family>`
    (random weights), `random:<preset>` or `trained:<family>`. Returns a LoadedVLM
    (`.model`, `.processor`, `.adapter`, `.path`). Same as `edgevlm ... --model`."""
    from edgevlm.loader import load as _load

    return _load(model, device=device, device_map=device_map, dtype=dtype, seed=seed,
                 attn_implementation=attn_implementation)


def calibration(spec: str = "builtin:32", *, seed: int = 0):
    """Calibration samples from a spec (`builtin[:N]`, `tasks[:N[:split]]`, a folder of
    images, a .jsonl file), split (seeded) into `.scoring` (chooses layers) and `.heldout`
    (judges them). Same as `--calib`."""
    from edgevlm.pipeline import calibration as _calibration

    return _calibration(spec, seed)


def score(vlm, calib, method: str = "bi", *, tokens: str | None = None, batch_size: int = 4,
          cache: bool = True, progress: bool = False, **options):
    """Score every decoder layer (LayerScores, higher = more important) on the scoring
    part of `calib` (a Calibration, or a list of samples). `method`: bi, angular, lc, svl
    (`edgevlm list methods`); `tokens` and `options` as `--tokens` / `--option` (e.g.
    n=3 for angular, p=0.5 for svl). Scores are cached like the CLI's unless `cache` is
    False or `vlm` was pruned in memory and not saved. Same as `edgevlm score`."""
    from edgevlm.scoring import score as _score
    from edgevlm.scoring import score_cached

    samples = list(getattr(calib, "scoring", calib))
    description = getattr(calib, "description", None)
    if cache and _in_sync(vlm):
        return score_cached(vlm, samples, method, tokens=tokens, batch_size=batch_size,
                            progress=progress, calibration=description, **options)
    return _score(vlm, samples, method, tokens=tokens, batch_size=batch_size,
                  progress=progress, calibration=description, **options)


def make_plan(vlm, scores, *, ratio: float | None = None, n_layers: int | None = None,
              protect=None):
    """A PrunePlan that removes the least important layers of `vlm` by `scores` (exactly
    one of `ratio` and `n_layers`; `protect` as `--protect`, e.g. "last" or [0, 5]). Angular
    scores give a contiguous block; Gemma 3 keeps its local/global pattern. The plan has
    to_json/from_json (`plan.to_dict()`, `PrunePlan.from_dict`) and replays with `--plan`."""
    from edgevlm.pipeline import plan_for

    return plan_for(vlm, scores, ratio=ratio, n_layers=n_layers, protect=protect)


def prune_(vlm, plan, out: str | Path | None = None) -> Path | None:
    """Remove `plan`'s layers from `vlm` in place (renumbered, config sliced, the plan
    recorded in config.json as `edgevlm_plan`). With `out`, also save a stock checkpoint
    there (model, processor, tokenizer) and point `vlm.path` at it; returns that folder.
    Same as `edgevlm prune`."""
    from edgevlm.prune import prune_ as _prune
    from edgevlm.prune import save_pruned

    _prune(vlm, plan)
    setattr(vlm.model, _PLAN_ATTR, plan)
    if out is None:
        return None
    vlm.path = Path(save_pruned(vlm, Path(out)))
    return vlm.path


def export(model, out: str | Path, target: str | _ExportConfig = "onnx", *, calib=None,
           samples=None, verify: bool = True, force: bool = False, progress: bool = False):
    """Export `model` (a LoadedVLM, pruned or not, or a checkpoint folder / model name) to
    the folder `out` for `target` ("onnx", "gguf", or an OnnxExport / GgufExport config),
    verified against PyTorch on `samples` (default: the held-out part of `calib`, else the
    exporter's own) unless `verify` is False. A model pruned in memory and not saved is
    saved to out/pruned first. Writes out/manifest.json and returns the manifest (an
    ExportArtifact: `.files`, `.parity`, `.quantization`). `out` is written atomically;
    an existing `out` needs `force`. Same as `edgevlm export` on an already pruned model."""
    from edgevlm.outdir import check_writable, staged_dir
    from edgevlm.pipeline import export_name, export_target
    from edgevlm.targets import TARGETS
    from edgevlm.ui import quieted

    config = EXPORT_CONFIGS[TARGETS.get(target).name]() if isinstance(target, str) else target
    spec = TARGETS.get(config.target)
    options = config.options()
    spec.check(config.quant, None, **{k: v for k, v in options.items() if k != "name"})
    out = Path(out)
    check_writable(out, force)
    if samples is None and calib is not None:
        samples = calib.heldout or calib.scoring
    with staged_dir(out, force) as tmp:
        if isinstance(model, (str, Path)):
            from edgevlm.loader import resolve

            name, model_dir, plan = str(model), resolve(str(model)), None
        else:
            spec.check(config.quant, model.config,
                       **{k: v for k, v in options.items() if k != "name"})
            name, plan = model.name, getattr(model.model, _PLAN_ATTR, None)
            model_dir = model.path if _in_sync(model) else _save(model, tmp / "pruned")
        if config.target == "gguf" and options.get("name") is None:
            options["name"] = export_name(name, plan)
        with quieted(native_stdout=not progress):
            artifact = export_target(spec.name, Path(model_dir), tmp, quant=config.quant,
                                     base_model=name, verify=verify,
                                     samples=samples, progress=progress, **options)
    return artifact


def verify(export_dir: str | Path):
    """Check an export folder: every file's sha256 against manifest.json, and the
    parity report recorded when `export` compared it with PyTorch (raises when a file
    changed or a recorded check failed). Returns that report, a ParityReport
    (`.checks`, `.passed`, `.summary()`), or None for an export made without verification."""
    from edgevlm.export.parity import ParityReport
    from edgevlm.runtimes.artifact import open_export

    artifact, _ = open_export(export_dir, check_hashes=True)
    if not artifact.parity:
        return None
    report = ParityReport.from_dict(artifact.parity)
    report.raise_if_failed(f"{export_dir}: recorded checks failed", "re-export it (edgevlm.export)")
    return report


def run(export_dir: str | Path, prompt: str, image: Any = None, *, max_tokens: int = 64,
        runtime: str | None = None, threads: int | None = None, device: str = "auto") -> str:
    """Answer `prompt` about `image` (a PIL image or a file path; default: the bench
    picture) with an export, greedily, through the runner a device uses (no torch).
    Same as `edgevlm run`."""
    from edgevlm.runtimes.bench import bench_image, make_runner

    if image is None:
        image = bench_image()
    elif isinstance(image, (str, Path)):
        from PIL import Image

        image = Image.open(image).convert("RGB")
    runner, _, _ = make_runner(export_dir, _device(device)[0], runtime=runtime, threads=threads)
    runner.load()
    try:
        return runner.generate(image, prompt, max_tokens=max_tokens).text
    finally:
        runner.close()


def bench(exports, *, runs: int = 5, warmup: int = 1, gen_tokens: int = 128,
          threads: int | None = None, runtime: str | None = None, device: str = "auto"):
    """Time one export folder (returns a BenchResult) or several (a list, each in its own
    process, repetitions interleaved) on this device: image encode, TTFT, prefill and
    decode tokens/s, peak memory. `device`: "auto" or a profile name. Same as `edgevlm bench`."""
    from edgevlm.runtimes.bench import BenchConfig, bench_many
    from edgevlm.runtimes.bench import bench as _bench

    if runs < 1 or warmup < 0 or gen_tokens < 2:
        raise UsageError("runs must be >= 1, warmup >= 0 and gen_tokens >= 2",
                         "e.g. runs=5, warmup=1, gen_tokens=128")
    profile, facts = _device(device)
    config = BenchConfig(runs=runs, warmup=warmup, gen_tokens=gen_tokens, threads=threads,
                         runtime=runtime)
    if isinstance(exports, (str, Path)):
        return _bench(exports, config, profile=profile, facts=facts)
    return bench_many(list(exports), config, profile=profile, facts=facts)


# ------------------------------------------------------------------------------ helpers
def _device(name: str):
    from edgevlm.devices import HostFacts, detect, get_profile

    if name == "auto":
        facts = HostFacts.read()
        return detect(facts), facts
    return get_profile(name), None


def _in_sync(vlm) -> bool:
    """Whether `vlm.path` holds what is in memory (as far as pruning goes): the layer
    count and plan record of its config.json match the loaded model's."""
    saved = json.loads((Path(vlm.path) / "config.json").read_text())
    if saved.get("edgevlm_plan") != getattr(vlm.config, "edgevlm_plan", None):
        return False
    text = saved.get("text_config") or saved
    n_saved = text.get("num_hidden_layers", saved.get("num_hidden_layers"))
    return n_saved is None or n_saved == len(vlm.adapter.layers(vlm.model))


def _save(vlm, dest: Path) -> Path:
    from edgevlm.prune import save_pruned

    return Path(save_pruned(vlm, dest))


__all__ = ["DEFAULT_MODEL", "EXPORT_CONFIGS", "GgufExport", "OnnxExport", "bench", "calibration",
           "export", "load", "make_plan", "prune_", "run", "score", "verify"]
