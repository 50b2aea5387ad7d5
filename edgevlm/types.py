"""Core pipeline values. Stdlib dataclasses with a JSON form; layer indices are 0-based
and always refer to the ORIGINAL model."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgevlm.errors import UsageError

SCHEMA_VERSION = 1


class JsonMixin:
    """to_dict/from_dict/save/load for flat dataclasses (nested ones override from_dict)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UsageError(f"{cls.__name__}: unknown keys {sorted(unknown)}",
                             "was this file written by a newer edgevlm?")
        missing = [f.name for f in fields(cls) if f.name not in data
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise UsageError(f"{cls.__name__}: missing keys {missing}",
                             "was this file written by another edgevlm version?")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp file + rename): no half-written file on interrupt."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{path} does not exist", f"check the path to the {cls.__name__} file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not valid JSON: {exc}", "regenerate the file") from exc
        return cls.from_dict(data)


@dataclass
class LayerScores(JsonMixin):
    """Per-layer importance from one scoring method; higher = more important."""

    method: str
    scores: list[float]
    options: dict = field(default_factory=dict)
    model: str = ""
    fingerprint: str = ""
    calibration: dict = field(default_factory=dict)
    version: str = ""
    extra: dict = field(default_factory=dict)  # method-specific (e.g. angular block distances)

    @property
    def n_layers(self) -> int:
        return len(self.scores)

    def ascending(self) -> list[int]:
        """Layer indices, least important first (ties broken by index: deterministic)."""
        return sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))

    def cache_key(self) -> dict:
        return {"method": self.method, "options": self.options, "fingerprint": self.fingerprint,
                "calibration": self.calibration.get("fingerprint")}


@dataclass
class PrunePlan(JsonMixin):
    """Which original decoder layers to drop (mode 'drop') or freeze for visual tokens
    (mode 'freeze', ShortV)."""

    method: str
    n_layers: int  # layers in the original model
    layers: list[int]  # dropped or frozen, original indices, sorted
    mode: str = "drop"
    ratio: float | None = None
    protected: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    # The vision-tower plan (a PrunePlan as a dict, edgevlm.vision_prune), if any: one plan
    # file and one manifest record describe everything that was removed.
    vision: dict | None = None
    # Training-free subspace compensation applied when the layers were removed
    # (edgevlm.compensate): k, the edited layers, the calibration used.
    compensation: dict | None = None
    # Uniform width pruning (edgevlm.width) instead of removing layers: query heads, kv heads,
    # MLP channels as [before, after], head_dim, decoder-layer parameters; `layers` is empty.
    width: dict | None = None

    @property
    def kept(self) -> list[int]:
        if self.mode != "drop":
            return list(range(self.n_layers))
        dropped = set(self.layers)
        return [i for i in range(self.n_layers) if i not in dropped]

    def validate(self) -> PrunePlan:
        if self.mode not in ("drop", "freeze"):
            raise UsageError(f"unknown plan mode '{self.mode}'", "use 'drop' or 'freeze'")
        bad = [i for i in self.layers if not 0 <= i < self.n_layers]
        if bad:
            raise UsageError(f"plan names layers {bad} outside 0..{self.n_layers - 1}",
                             "was the plan made for a different model?")
        if len(set(self.layers)) != len(self.layers):
            raise UsageError("plan lists a layer twice", "regenerate the plan")
        if set(self.layers) & set(self.protected):
            raise UsageError(f"plan drops protected layers {sorted(set(self.layers) & set(self.protected))}",
                             "regenerate the plan")
        if self.mode == "drop" and len(self.layers) >= self.n_layers:
            raise UsageError(f"plan drops all {self.n_layers} layers", "use a smaller ratio")
        return self


@dataclass
class FileEntry(JsonMixin):
    """One file of an export."""

    role: str  # e.g. "decoder", "vision_encoder", "text_model", "mmproj"
    path: str  # relative to the manifest's folder
    sha256: str
    bytes: int
    dtype: str = ""


# manifest.json's schema. 2: `plan` is a PrunePlan, `io` an ExportIO read by the runners,
# quantization keys `decoder` / `vision_encoder` on both targets, `recovery` on its own.
MANIFEST_SCHEMA = 2


@dataclass
class ExportIO(JsonMixin):
    """manifest.io: what a runner needs to feed an export, written by the exporter and read
    by both runners (they re-derive none of it from config.json)."""

    family: str
    image_token_id: int | None
    image_token: str | None  # the token's text, e.g. "<image>"
    num_layers: int  # decoder layers in the exported model
    hidden_size: int
    vocab_size: int
    files: dict[str, dict[str, str]]  # role -> precision -> path relative to the manifest
    graphs: dict = field(default_factory=dict)  # ONNX: each graph's I/O, KV geometry, positions
    gguf: dict = field(default_factory=dict)  # GGUF: text arch, projector, image, tokenizer

    def path(self, role: str, precision: str | None = None) -> str:
        """The file of `role` at `precision` (None: the role's only file)."""
        have = self.files.get(role) or {}
        if precision is None and len(have) == 1:
            return next(iter(have.values()))
        if precision not in have:
            raise UsageError(f"this export has no {role} file at precision '{precision}'",
                             f"it has: {', '.join(sorted(have)) or 'none'}; export it with "
                             "that quantization")
        return have[precision]


@dataclass
class ExportArtifact(JsonMixin):
    """manifest.json: everything a runner needs to run and trust an export."""

    target: str
    files: list[FileEntry]
    base_model: str
    io: ExportIO
    plan: PrunePlan | None = None  # what was removed or frozen; None for an unpruned model
    recovery: dict | None = None  # `heal` record when the checkpoint was trained back
    quantization: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    schema_version: int = MANIFEST_SCHEMA
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest.json") -> ExportArtifact:
        version = data.get("schema_version")
        if not isinstance(version, int) or version < MANIFEST_SCHEMA:
            target = data.get("target") or "onnx|gguf"
            model = data.get("base_model") or "MODEL"
            raise UsageError(
                f"{source} was made by an older edgevlm (manifest schema {version or 'none'}, "
                f"this version reads {MANIFEST_SCHEMA})",
                f"re-export it with `edgevlm export --model {model} --target {target} ...`")
        if version > MANIFEST_SCHEMA:
            raise UsageError(f"{source} has manifest schema {version}, newer than this edgevlm "
                             f"reads ({MANIFEST_SCHEMA})", "pip install -U edgevlm")
        data = dict(data, files=[FileEntry.from_dict(f) for f in data.get("files", [])],
                    io=ExportIO.from_dict(data.get("io") or {}),
                    plan=PrunePlan.from_dict(data["plan"]) if data.get("plan") else None)
        return super().from_dict.__func__(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> ExportArtifact:
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{path} does not exist", "pass an export folder or its manifest.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} is not valid JSON: {exc}", "export it again") from exc
        return cls.from_dict(data, str(path))

    def file(self, role: str) -> FileEntry | None:
        return next((f for f in self.files if f.role == role), None)


def jsonable(value: Any) -> Any:
    """Floats/ints from numpy or torch scalars -> plain Python, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


@dataclass
class BenchResult(JsonMixin):
    """bench.json: one export timed on one device. Unmeasurable figures are None, never 0."""

    export: dict  # manifest path, target, quant, family, decoder layers
    device: dict  # profile name, detected facts
    runtime: str
    config: dict  # runs, warmup, gen_tokens, threads, prompt
    load_s: float
    runs: list[dict]  # per run: image_ms, ttft_ms, prefill_tok_s, decode_tok_s, ...
    summary: dict  # per metric: median, min, max, stdev
    peak_rss_mb: float | None = None
    peak_ram_mb: float | None = None  # Jetson unified memory (tegrastats)
    power_w: dict | None = None  # Jetson mean/peak (tegrastats)
    versions: dict = field(default_factory=dict)
    memory_mb: dict | None = None  # peak RSS per phase: load, image, prefill, decode
    roofline: dict | None = None  # decode vs bandwidth, prefill/image vs peak compute
    schema_version: int = SCHEMA_VERSION
