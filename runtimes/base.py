"""The runner interface and registry. A runner drives one export target, torch-free."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgevlm.errors import MissingDependencyError
from edgevlm.registry import Registry


@dataclass
class Trace:
    """One timed generation. Times are seconds from the start of generate()."""

    prompt_tokens: int
    tokens: list[int]
    text: str
    image_s: float | None  # image encoding (vision encoder + projector)
    prefill_s: float  # prompt processing after the image, up to the first token's logits
    token_times: list[float] = field(default_factory=list)  # when each new token was ready
    stop: str = "max_tokens"  # or "eos"

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] if self.token_times else float("nan")

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens/s after the first token (each needs one decoder step)."""
        if len(self.token_times) < 2:
            return None
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None


class Runner:
    """Base class: subclasses implement load() and generate()."""

    name = ""
    target = ""
    package = ""  # import name of the runtime library
    pip_name = ""

    def __init__(self, root: Path, artifact, profile=None, threads: int | None = None,
                 max_image_tokens: int | None = None):
        """`max_image_tokens`: at most this many image tokens per image (runtimes/image_budget.py);
        default: the budget the export was made with, if any."""
        self.root, self.artifact, self.profile = Path(root), artifact, profile
        self.threads = threads or (profile.resolve_threads() if profile else None)
        from edgevlm.runtimes.image_budget import check_value, export_budget

        check_value(max_image_tokens)
        self.max_image_tokens = max_image_tokens or export_budget(artifact)

    def load(self) -> None:
        raise NotImplementedError

    def generate(self, image, prompt: str, *, max_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False,
                 on_text: Callable[[str], None] | None = None) -> Trace:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @classmethod
    def require(cls, profile=None):
        """Import the runtime library or raise exit-3 with the device's install command."""
        try:
            return importlib.import_module(cls.package)
        except ImportError as exc:
            hint = None
            if profile is not None:
                hint = (profile.install.llama_cpp if cls.target == "gguf"
                        else profile.install.onnxruntime)
            raise MissingDependencyError(cls.pip_name, "runtime", f"the {cls.name} runner",
                                         fix=hint) from exc


# name -> (export target, "module:Class"); the module is imported only when used.
RUNTIMES: Registry[tuple[str, str]] = Registry("runtime")
RUNTIMES.add("onnxruntime", ("onnx", "edgevlm.runtimes.ort_runner:OrtRunner"))
RUNTIMES.add("llama.cpp", ("gguf", "edgevlm.runtimes.llamacpp_runner:LlamaCppRunner"))


def runner_class(name: str) -> type[Runner]:
    module, _, cls = RUNTIMES.get(name)[1].partition(":")
    return getattr(importlib.import_module(module), cls)


def runner_for_target(target: str) -> type[Runner]:
    for name, (runs, _) in RUNTIMES.items():
        if runs == target:
            return runner_class(name)
    raise KeyError(target)
