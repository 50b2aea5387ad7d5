"""Layer scoring: which decoder layers matter (docs/methods.md sections 1-3).

`score(vlm, samples, "bi")` runs a method on calibration samples and returns LayerScores
(HIGHER = MORE important); `score_cached(...)` reuses a matching scores.json. Methods live
in the SCORERS registry: bi, angular, lc, svl.
"""

from __future__ import annotations

from pathlib import Path

from edgevlm import ui
from edgevlm.scoring import angular, bi, lc, svl  # noqa: F401  (register the methods)
from edgevlm.scoring.base import SCORERS, Scorer, register
from edgevlm.scoring.cache import (
    STATS,
    cache_file,
    cache_key,
    calibration_info,
    load_matching,
    samples_fingerprint,
)
from edgevlm.scoring.hooks import TOKEN_SUBSETS, iter_batches
from edgevlm.types import LayerScores, jsonable


def score(vlm, samples, method: str, *, tokens: str | None = None, batch_size: int = 4,
          progress: bool = True, calibration: dict | None = None, **options) -> LayerScores:
    """Score every decoder layer of `vlm` with `method` on calibration `samples`.

    `tokens` is the token subset for methods that take one (bi: all|text|visual, default
    all; lc: default visual); other options are method-specific (angular: n; lc: naive;
    svl: p). `calibration` is the calibration set's description, recorded with the scores
    (its `fingerprint` replaced by that of exactly these samples). Raises UsageError for an
    unknown method/option/subset and CalibrationError when there are no samples.
    """
    scorer, stored, runtime = _resolve(method, tokens, options)
    samples = list(samples)
    info = calibration_info(samples, calibration)
    return _run(vlm, samples, scorer, stored, runtime, info, batch_size, progress)


def score_cached(vlm, samples, method: str, *, tokens: str | None = None, batch_size: int = 4,
                 progress: bool = True, calibration: dict | None = None,
                 path: str | Path | None = None, use_cache: bool = True, **options) -> LayerScores:
    """score(), unless matching scores exist: first `path` (e.g. out/scores.json), then the
    cache (EDGEVLM_CACHE/scores/). A match has the same method, options, model fingerprint
    and calibration-sample fingerprint. Fresh scores are written to the cache and to `path`
    (when given); a stale `path` is overwritten. STATS counts 'computed' and 'reused'."""
    scorer, stored, runtime = _resolve(method, tokens, options)
    samples = list(samples)
    info = calibration_info(samples, calibration)
    key = cache_key(scorer.name, stored, vlm.fingerprint(), info["fingerprint"])
    candidates = ([Path(path)] if path else []) + ([cache_file(key)] if use_cache else [])
    for candidate in candidates:
        found = load_matching(candidate, key)
        if found is not None:
            STATS["reused"] += 1
            if path and candidate != Path(path):
                found.save(path)
            return found
    result = _run(vlm, samples, scorer, stored, runtime, info, batch_size, progress)
    STATS["computed"] += 1
    if use_cache:
        result.save(cache_file(key))
    if path:
        result.save(path)
    return result


def _run(vlm, samples, scorer: Scorer, stored: dict, runtime: dict, info: dict,
         batch_size: int, progress: bool, *, n_layers: int | None = None,
         label: str | None = None) -> LayerScores:
    """Run `scorer` over `samples` in batches (inference mode, a progress bar labelled
    `label`) and wrap its values as LayerScores named `label` (default: the scorer's name).
    `n_layers` defaults to the decoder's depth; vision scoring passes the tower's."""
    import torch

    from edgevlm import __version__

    if n_layers is None:
        n_layers = len(vlm.adapter.layers(vlm.model))
    label = label or scorer.name
    bar = ui.progress(desc=f"{label} scores", total=len(samples), unit="sample", enabled=progress)

    def batches():
        for batch in iter_batches(vlm, samples, batch_size):
            yield batch
            bar.update(batch.size)

    try:
        with torch.inference_mode():
            values, extra = scorer.run(vlm, batches(), n_layers, **stored, **runtime)
    finally:
        bar.close()
    return LayerScores(method=label, scores=[float(v) for v in values], options=stored,
                       model=vlm.name, fingerprint=vlm.fingerprint(), calibration=info,
                       version=__version__, extra=jsonable(extra))


def _resolve(method: str, tokens: str | None, options: dict):
    from edgevlm.errors import UsageError

    scorer = SCORERS.get(method)
    if tokens is not None:
        if "tokens" not in scorer.defaults:
            raise UsageError(f"scoring method '{scorer.name}' does not take a token subset",
                             "drop --tokens (it applies to: "
                             + ", ".join(s.name for s in SCORERS if "tokens" in s.defaults) + ")")
        options = dict(options, tokens=tokens)
    stored, runtime = scorer.resolve(options)
    return scorer, stored, runtime


__all__ = ["SCORERS", "STATS", "TOKEN_SUBSETS", "LayerScores", "Scorer", "register", "samples_fingerprint",
           "score", "score_cached"]
