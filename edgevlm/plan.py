"""make_plan: from layer scores to the set of decoder layers to remove (one-shot)."""

from __future__ import annotations

import math
import random

from edgevlm.errors import UnsupportedModelError, UsageError
from edgevlm.types import LayerScores, PrunePlan


def layers_to_drop(n_total: int, ratio: float | None, n_layers: int | None) -> int:
    """How many layers a ratio or an explicit count removes, with clear errors."""
    if (ratio is None) == (n_layers is None):
        raise UsageError("give exactly one of --ratio or --n-layers",
                         "e.g. --ratio 0.3 (30% of decoder layers) or --n-layers 4")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise UsageError(f"--ratio {ratio} is outside (0, 1)",
                             "use a fraction of decoder layers, e.g. --ratio 0.3")
        n = round(ratio * n_total)
        if n == 0:
            raise UsageError(f"--ratio {ratio} of {n_total} layers removes no layer",
                             f"use --ratio >= {1 / n_total:.3f} or --n-layers 1")
    else:
        n = n_layers
        if n < 1:
            raise UsageError(f"--n-layers {n} must be at least 1", "use --n-layers 1 or more")
    if n >= n_total:
        raise UsageError(f"removing {n} of {n_total} decoder layers leaves none",
                         f"remove at most {n_total - 1} layers")
    return n


def parse_protect(spec: str | list | None, n_total: int) -> list[int]:
    """'first,last,3' -> sorted original indices."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else spec
    out = set()
    for item in items:
        item = str(item).strip()
        if item == "first":
            out.add(0)
        elif item == "last":
            out.add(n_total - 1)
        elif item.lstrip("-").isdigit() and -n_total <= int(item) < n_total:
            out.add(int(item) % n_total)
        else:
            raise UsageError(f"cannot protect layer '{item}' of {n_total}",
                             f"use first, last or indices 0..{n_total - 1}")
    return sorted(out)


def make_plan(scores: LayerScores, *, ratio: float | None = None, n_layers: int | None = None,
              protect=None, layer_types: list[str] | None = None,
              layer_period: int | None = None, mode: str = "drop") -> PrunePlan:
    """Drop the n least important layers (one-shot). `angular` scores give the best
    contiguous block; families with a local/global attention period (Gemma 3) keep it.
    mode 'freeze' (ShortV): the n least important layers are frozen for visual tokens
    instead; nothing is removed, so no attention pattern constrains the choice."""
    total = scores.n_layers
    n = layers_to_drop(total, ratio, n_layers)
    protected = parse_protect(protect, total)
    if len(protected) + n > total:
        raise UsageError(f"cannot remove {n} layers with {len(protected)} of {total} protected",
                         "protect fewer layers or remove fewer")
    if mode == "freeze":
        frozen = [i for i in scores.ascending() if i not in protected][:n]
        return PrunePlan(method=scores.method, n_layers=total, layers=sorted(frozen), mode="freeze",
                         ratio=ratio, protected=protected, scores=list(scores.scores)).validate()
    if scores.method == "angular":
        dropped = _best_block(scores, n, protected, layer_types, layer_period)
    elif layer_period and layer_types:
        dropped = _keep_period(scores.scores, n, protected, layer_types, layer_period)
    else:
        order = [i for i in scores.ascending() if i not in protected]
        dropped = order[:n]
    return PrunePlan(method=scores.method, n_layers=total, layers=sorted(dropped),
                     ratio=ratio, protected=protected, scores=list(scores.scores)).validate()


def _best_block(scores: LayerScores, n: int, protected: list[int], layer_types=None,
                layer_period=None) -> list[int]:
    """The contiguous block of n layers with the smallest angular distance among those that
    avoid the protected layers and (Gemma 3) keep the local/global attention pattern."""
    distances = scores.extra.get("block_distances")
    if scores.extra.get("n") != n or not distances:
        raise UsageError(f"angular scores were computed for blocks of {scores.extra.get('n')} "
                         f"layers, the plan removes {n}",
                         "re-score with --method angular and the same --ratio/--n-layers")
    starts = [s for s in range(len(distances))
              if not any(s <= p < s + n for p in protected)]
    if not starts:
        raise UsageError(f"no contiguous block of {n} layers avoids the protected layers",
                         "protect fewer layers")
    if layer_period and layer_types:
        starts = [s for s in starts if _keeps_period(range(s, s + n), layer_types)]
        if not starts:
            raise UnsupportedModelError(
                f"no contiguous block of {n} layers keeps the {layer_period}-layer local/global "
                "attention pattern", f"use --n-layers as a multiple of {layer_period}, "
                "or a non-contiguous method such as bi")
    best = min(starts, key=lambda s: (distances[s], s))
    return list(range(best, best + n))


def _keep_period(values: list[float], n: int, protected: list[int], layer_types: list[str],
                 period: int) -> list[int]:
    """Least total importance removed such that the kept layers' attention types still
    follow the original pattern position by position (runtimes derive local/global from
    the layer index modulo the period). Dynamic programming over (layer, kept so far)."""
    total, keep = len(values), len(values) - n
    pattern = [layer_types[j % period] if j >= len(layer_types) else layer_types[j]
               for j in range(total)]
    inf = math.inf
    cost = [[inf] * (keep + 1) for _ in range(total + 1)]
    choice = [[None] * (keep + 1) for _ in range(total + 1)]
    cost[0][0] = 0.0
    for i in range(total):
        for j in range(keep + 1):
            if cost[i][j] == inf:
                continue
            if i not in protected and cost[i][j] + values[i] < cost[i + 1][j]:
                cost[i + 1][j], choice[i + 1][j] = cost[i][j] + values[i], "drop"
            if j < keep and layer_types[i] == pattern[j] and cost[i][j] < cost[i + 1][j + 1]:
                cost[i + 1][j + 1], choice[i + 1][j + 1] = cost[i][j], "keep"
    if cost[total][keep] == inf:
        raise UnsupportedModelError(
            f"cannot remove {n} layers and keep the {period}-layer local/global attention "
            "pattern that llama.cpp and the ONNX builders assume",
            f"remove a multiple of {period} layers, or protect fewer layers")
    dropped, j = [], keep
    for i in range(total, 0, -1):
        if choice[i][j] == "drop":
            dropped.append(i - 1)
        else:
            j -= 1
    return dropped


def _keeps_period(dropped, layer_types: list[str]) -> bool:
    """Whether the kept layers' attention types still follow the pattern position by position."""
    dropped = set(dropped)
    kept = [t for i, t in enumerate(layer_types) if i not in dropped]
    return all(t == layer_types[j] for j, t in enumerate(kept))


def check_period(dropped: list[int], layer_types: list[str] | None, period: int | None) -> None:
    """Refuse a removal that breaks a local/global attention pattern (e.g. a replayed plan)."""
    if period and layer_types and not _keeps_period(dropped, layer_types):
        raise UnsupportedModelError(
            f"removing layers {sorted(dropped)} breaks the {period}-layer local/global "
            "attention pattern that llama.cpp and the ONNX builders assume",
            "make the plan on this model (edgevlm prune --method ...), which keeps the "
            "pattern, or remove layers whose removal keeps it")


def random_plan(n_total: int, n: int, rng: random.Random, *, protected=(), layer_types=None,
                layer_period=None) -> PrunePlan:
    """A random plan of the same size (baseline for judging a scorer)."""
    values = [rng.random() for _ in range(n_total)]
    scores = LayerScores(method="random", scores=values)
    return make_plan(scores, n_layers=n, protect=list(protected), layer_types=layer_types,
                     layer_period=layer_period)


# config.json's key for the plan (PrunePlan's JSON form, written by prune_ and width pruning).
PLAN_CONFIG_KEY = "edgevlm_plan"


def plan_from_config(config: dict) -> PrunePlan | None:
    """The plan a checkpoint's config.json records, as a PrunePlan (None: not pruned): its
    `edgevlm_plan`, or the ShortV freeze record (a plan of mode 'freeze'), with the vision-tower
    record as `vision`: all three are PrunePlan JSON. A record of an older edgevlm (keys
    `dropped`/`original_layers`/`tokens`) is refused: its meaning is not guessed."""
    from edgevlm.freeze import FREEZE_CONFIG_KEY
    from edgevlm.vision_prune import VISION_PLAN_CONFIG_KEY

    record, freeze, vision = (_recorded_plan(config, key) for key in
                              (PLAN_CONFIG_KEY, FREEZE_CONFIG_KEY, VISION_PLAN_CONFIG_KEY))
    plan = record or freeze
    if vision and (plan is None or plan.vision is None):
        plan = plan or PrunePlan(method=vision.method, n_layers=_text_layers(config), layers=[])
        plan.vision = vision.to_dict()
    return plan.validate() if plan else None


def _recorded_plan(config: dict, key: str) -> PrunePlan | None:
    record = config.get(key)
    if not record:
        return None
    if {"dropped", "original_layers", "tokens"} & set(record):
        raise UsageError(f"config.json's {key} was written by an older edgevlm",
                         "prune the base model again with this edgevlm (edgevlm prune ...)")
    return PrunePlan.from_dict(record)


def _text_layers(config: dict) -> int:
    text = config.get("text_config") or config
    return int(text["num_hidden_layers"])
