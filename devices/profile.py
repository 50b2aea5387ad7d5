"""DeviceProfile: which runtime, providers, threads and memory budget suit one kind of device.

Profiles are data (``devices/profiles/*.toml``). Files are validated strictly: an unknown,
missing or mistyped key is a UsageError naming the key and the file, because a silently
ignored typo ("gpu_layer = -1") would make a benchmark quietly run on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevlm.errors import MissingDependencyError, UsageError

if TYPE_CHECKING:
    from .hostfacts import HostFacts

RUNTIMES = ("llama.cpp", "onnxruntime")
MEMORY_SOURCES = ("rss", "tegrastats")
POWER_SOURCES = ("tegrastats", "none")
# Graph roles of an ONNX export (onnx/vision_encoder.onnx, embed_tokens.onnx, decoder_model_merged.onnx).
GRAPHS = ("vision_encoder", "embed_tokens", "decoder")


@dataclass(frozen=True)
class MatchRules:
    """Conditions a host must meet for a profile to apply; every rule given must hold.

    List rules pass when any entry matches (case-insensitive); an empty list means "any".
    ``system``/``machine`` compare whole values of platform.system()/platform.machine();
    the ``*_contains`` rules are substrings of /proc/device-tree/model, /etc/nv_tegra_release
    and the CPU brand string. ``jetson`` True/False requires/forbids a Jetson; unset = any.
    """

    system: tuple[str, ...] = ()
    machine: tuple[str, ...] = ()
    jetson: bool | None = None
    model_contains: tuple[str, ...] = ()
    tegra_release_contains: tuple[str, ...] = ()
    cpu_brand_contains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Providers:
    """onnxruntime execution providers, in preference order, for each graph of an export."""

    vision_encoder: tuple[str, ...]
    embed_tokens: tuple[str, ...]
    decoder: tuple[str, ...]

    def for_graph(self, graph: str) -> list[str]:
        """Providers for a graph named by role or file ('onnx/decoder_model_merged_q4.onnx')."""
        stem = Path(graph).name.removesuffix(".onnx")
        # Prefix match so quantized variants (vision_encoder_int8, decoder_model_merged_q4) resolve.
        for role in GRAPHS:
            if stem.startswith(role):
                return list(getattr(self, role))
        raise UsageError(
            f"no execution providers for ONNX graph '{graph}'",
            f"graph names start with one of: {', '.join(GRAPHS)}",
        )


@dataclass(frozen=True)
class InstallHints:
    """Shell commands that install edgevlm's runtime side and each runner on this device."""

    edgevlm: str
    onnxruntime: str
    llama_cpp: str


@dataclass(frozen=True)
class DeviceProfile:
    """Everything the runners and the benchmark need to know about one kind of device.

    ``memory_bandwidth_gbs`` and ``peak_gflops`` (FP32, of the processor the runtime uses)
    are the roofline `edgevlm bench` measures decode and prefill against.
    ``threads`` 0 means "physical cores of the host at run time" (see resolve_threads);
    ``gpu_layers`` is llama.cpp's n_gpu_layers (-1 = all, 0 = CPU only);
    ``memory_source`` says how peak memory is read ('rss' or 'tegrastats', the latter for
    unified memory where GPU allocations are invisible to RSS); ``power_source`` is
    'tegrastats' or 'none'. ``priority``: higher is tried first by detect().
    """

    name: str
    description: str
    priority: int
    runtime: str
    threads: int
    gpu_layers: int
    memory_budget_mb: int
    memory_bandwidth_gbs: float
    peak_gflops: float
    memory_source: str
    power_source: str
    match: MatchRules
    providers: Providers
    install: InstallHints

    def __post_init__(self):
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the same layout as the TOML file (an unset `jetson` rule is left out)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "device profile") -> DeviceProfile:
        """Build and validate a profile; errors name the offending key and ``source``."""
        return _build(cls, data, source, "")

    def providers_for(self, graph: str) -> list[str]:
        """onnxruntime providers for one graph of an export (role or file name)."""
        return self.providers.for_graph(graph)

    def resolve_threads(self, facts: HostFacts | None = None) -> int:
        """Thread count to use: the profile's, or the host's physical cores when it says 0."""
        if self.threads > 0:
            return self.threads
        if facts is None:
            from .hostfacts import HostFacts

            facts = HostFacts.read()
        cores = facts.physical_cores or facts.logical_cpus or 1
        # An affinity mask (taskset, containers) can allow fewer CPUs than the machine has.
        if facts.logical_cpus:
            cores = min(cores, facts.logical_cpus)
        return max(1, cores)


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate one profile TOML file; its ``name`` must equal the file stem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"cannot read device profile {path}: {exc.strerror or exc}",
            "pass an existing .toml file or a built-in profile name",
        ) from None
    return profile_from_toml(text, str(path), expected_name=path.stem)


def profile_from_toml(text: str, source: str, expected_name: str | None = None) -> DeviceProfile:
    """Parse profile TOML text; ``source`` (a file name) appears in every error."""
    profile = DeviceProfile.from_dict(_toml_loads(text, source), source)
    # The file name is what users type (--device NAME); a mismatch would make it unfindable.
    if expected_name is not None and profile.name != expected_name:
        raise UsageError(
            f"{source}: key 'name' is '{profile.name}' but the file is named '{expected_name}.toml'",
            f'rename the file or set name = "{expected_name}"',
        )
    return profile


def _toml_loads(text: str, source: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6 ships 3.10)
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                "tomli", "runtime", "Reading device profiles on Python < 3.11"
            ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}", "fix the file's syntax") from None


_NESTED = {"MatchRules": MatchRules, "Providers": Providers, "InstallHints": InstallHints}
_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool | None": "true or false",
    "tuple[str, ...]": "a list of strings",
}


def _build(cls, data: Any, source: str, prefix: str):
    """Instantiate dataclass ``cls`` from ``data``; the dataclass fields are the schema."""
    table = prefix.rstrip(".")
    if not isinstance(data, dict):
        raise UsageError(f"{source}: key '{table}' must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f" in [{table}]" if table else ""
    for key in data:
        if key not in fields:
            raise UsageError(
                f"{source}: unknown key '{prefix}{key}'",
                f"valid keys{where}: {', '.join(fields)}",
            )
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _convert(spec.type, data[name], source, prefix + name)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise UsageError(
                f"{source}: missing required key '{prefix}{name}'",
                f"add '{name} = ...'{where}",
            )
    try:
        return cls(**values)
    except UsageError as exc:  # a value check in __post_init__: say which file it came from
        raise UsageError(f"{source}: {exc.what}", exc.fix) from None


def _convert(kind: str, value: Any, source: str, key: str) -> Any:
    if kind in _NESTED:
        return _build(_NESTED[kind], value, source, key + ".")
    is_bool = isinstance(value, bool)
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "int":
        ok = isinstance(value, int) and not is_bool
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not is_bool
        value = float(value) if ok else value
    elif kind == "bool | None":
        ok = is_bool
    elif kind == "tuple[str, ...]":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # a field type this schema reader does not know: a bug here, not in the file
        raise TypeError(f"unsupported profile field type {kind!r}")
    if not ok:
        raise UsageError(
            f"{source}: key '{key}' must be {_KIND_WORDS[kind]}, got {type(value).__name__} {value!r}",
            f"change '{key}' to {_KIND_WORDS[kind]}",
        )
    return value


def _check_values(p: DeviceProfile) -> None:
    def bad(key: str, value: Any, wanted: str) -> UsageError:
        return UsageError(
            f"key '{key}' must be {wanted}, got {value!r} (profile '{p.name}')",
            f"set {key} to {wanted}",
        )

    for key, allowed in (
        ("runtime", RUNTIMES),
        ("memory_source", MEMORY_SOURCES),
        ("power_source", POWER_SOURCES),
    ):
        if getattr(p, key) not in allowed:
            raise bad(key, getattr(p, key), "one of " + ", ".join(f"'{a}'" for a in allowed))
    if not p.name.strip():
        raise bad("name", p.name, "a non-empty string")
    if p.threads < 0:
        raise bad("threads", p.threads, "0 (physical cores) or a positive count")
    if p.gpu_layers < -1:
        raise bad("gpu_layers", p.gpu_layers, "-1 (all), 0 (none) or a layer count")
    if p.memory_budget_mb <= 0:
        raise bad("memory_budget_mb", p.memory_budget_mb, "a positive number of MB")
    if p.memory_bandwidth_gbs <= 0:
        raise bad("memory_bandwidth_gbs", p.memory_bandwidth_gbs, "a positive GB/s figure")
    if p.peak_gflops <= 0:
        raise bad("peak_gflops", p.peak_gflops, "a positive GFLOP/s figure")
    for role in GRAPHS:
        names = getattr(p.providers, role)
        # Catches 'CUDA' or 'TensorRT' written instead of onnxruntime's provider names.
        if not names or any(not n.endswith("ExecutionProvider") for n in names):
            raise bad(
                f"providers.{role}", list(names), "a non-empty list of '...ExecutionProvider' names"
            )


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        # None means "rule not set": TOML has no null, so leaving it out keeps both layouts equal.
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
