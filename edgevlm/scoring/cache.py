"""scores.json reuse: same method + options + model fingerprint + calibration fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from edgevlm.errors import UsageError
from edgevlm.types import LayerScores

# Part of every cached scores file's name: bump it when a scorer or the prompt encoding
# changes the numbers computed for the same model and samples, so that older cached scores are
# never reused (2: SVL averages then normalises; one BOS for LLaVA / Gemma 3 prompts).
SCORES_VERSION = 2

# How often score_cached computed vs reused scores in this process (observability, tests).
STATS: Counter = Counter()


def samples_fingerprint(samples) -> str:
    """sha256 over the scored samples' pixels, sizes, prompts and answers, in order."""
    from edgevlm.calib import hash_samples

    return hash_samples(samples).hexdigest()


def calibration_info(samples, description: dict | None = None) -> dict:
    """What the scores were computed on: the calibration set's description, with
    `fingerprint` replaced by the fingerprint of exactly these samples (the set's own is
    kept as `set_fingerprint`)."""
    info = dict(description or {})
    if "fingerprint" in info:
        info["set_fingerprint"] = info["fingerprint"]
    info.update(fingerprint=samples_fingerprint(samples), n_samples=len(samples))
    return info


def cache_key(method: str, options: dict, fingerprint: str, calibration_fingerprint: str) -> dict:
    return {"method": method, "options": options, "fingerprint": fingerprint,
            "calibration": calibration_fingerprint}


def cache_file(key: dict) -> Path:
    from edgevlm.loader import cache_dir

    versioned = {**key, "scores_version": SCORES_VERSION}
    digest = hashlib.sha256(json.dumps(versioned, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "scores" / f"{key['method']}-{digest}.json"


def load_matching(path: Path, key: dict) -> LayerScores | None:
    """The scores in `path` if it exists and was computed for `key`, else None. A file that
    is not a scores file is an error (never silently overwritten)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        scores = LayerScores.load(path)
    except (UsageError, TypeError) as exc:
        raise UsageError(f"{path} exists but is not an edgevlm scores file ({exc})",
                         "delete it or choose another output") from exc
    return scores if _same(scores.cache_key(), key) else None


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
