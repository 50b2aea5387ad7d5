"""Shared fixtures: tiny models are built once per test session, in a private cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before any edgevlm import: keep tiny checkpoints out of the user's cache.
os.environ.setdefault("EDGEVLM_CACHE", str(Path(tempfile.gettempdir()) / "edgevlm-test-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "smolvlm", "llava", "gemma3"]


@pytest.fixture(scope="session")
def calib():
    from edgevlm.calib import load_calibration

    return load_calibration("builtin:8", seed=0)


_LOADED: dict = {}


def load_tiny(family: str):
    """A loaded tiny model, shared across tests (treat as read-only: deep-copy to mutate)."""
    if family not in _LOADED:
        from edgevlm.loader import load

        _LOADED[family] = load(f"tiny:{family}")
    return _LOADED[family]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family):
    return load_tiny(family)


def pruned_checkpoint(family: str, drop: list[int], dest):
    """A checkpoint folder of tiny:<family> with `drop` removed, made by the pruning stage."""
    import copy

    from edgevlm.loader import LoadedVLM
    from edgevlm.prune import prune_, save_pruned
    from edgevlm.types import PrunePlan

    base = load_tiny(family)
    vlm = LoadedVLM(model=copy.deepcopy(base.model), processor=base.processor,
                    adapter=base.adapter, name=base.name, path=base.path)
    prune_(vlm, PrunePlan("manual", base.adapter.num_layers(base.config), sorted(drop)))
    return save_pruned(vlm, dest)
