"""The scorer plug-in type and its registry (`edgevlm list methods`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgevlm.errors import UsageError
from edgevlm.registry import Registry


@dataclass(frozen=True)
class Scorer:
    """One layer-importance method.

    `run(vlm, batches, n_layers, progress, **options) -> (scores, extra)`; scores have one
    float per decoder layer, HIGHER = MORE important. `defaults` lists every option;
    `choices` restricts some to fixed values; `runtime` names options that change how a
    result is computed but not the result (kept out of the stored options and cache key).
    """

    name: str
    summary: str
    run: Callable
    defaults: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)
    runtime: tuple[str, ...] = ()
    paper: str = ""

    def resolve(self, options: dict) -> tuple[dict, dict]:
        """Validate user options against this scorer; returns (stored options, runtime options)."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise UsageError(f"scoring method '{self.name}' has no option {', '.join(map(repr, unknown))}",
                             f"options of '{self.name}': {accepted}")
        merged = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        for key, value in merged.items():
            # p=1 and p=1.0 are one request (and one cache entry)
            if isinstance(self.defaults[key], float) and type(value) is int:
                merged[key] = float(value)
        for key, allowed in self.choices.items():
            if merged[key] not in allowed:
                raise UsageError(f"'{merged[key]}' is not a valid {key} for '{self.name}'",
                                 f"use one of: {', '.join(map(str, allowed))}")
        stored = {k: v for k, v in merged.items() if k not in self.runtime}
        runtime = {k: v for k, v in merged.items() if k in self.runtime}
        return stored, runtime


SCORERS: Registry[Scorer] = Registry("scoring method")


def register(scorer: Scorer) -> Scorer:
    SCORERS.add(scorer.name, scorer)
    return scorer
