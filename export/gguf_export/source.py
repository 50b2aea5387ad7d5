"""Reading a checkpoint folder one tensor at a time (memory-mapped safetensors)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from edgevlm.errors import UsageError


class CheckpointSource:
    """Tensor names, shapes and lazily-read float32 data of a (possibly sharded) checkpoint.

    Keys are canonicalized through `rename` (raw name -> canonical name or None to skip), so
    the writers see one naming whatever layout transformers saved.
    """

    def __init__(self, folder: Path, rename):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{folder} has no *.safetensors files",
                             "pass a checkpoint folder saved with save_pretrained")
        self._stack = ExitStack()
        self._where: dict[str, tuple[object, str]] = {}
        for file in files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            for raw in handle.keys():
                name = rename(raw)
                if name is not None:
                    self._where[name] = (handle, raw)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        handle, raw = self._where[name]
        return tuple(handle.get_slice(raw).get_shape())

    def get(self, name: str):
        """The tensor as a float32 numpy array (one tensor in memory at a time)."""
        handle, raw = self._where[name]
        return handle.get_tensor(raw).float().numpy()


def read_config(folder: Path) -> dict:
    """config.json with a complete `text_config`. Hub files may be flat (Qwen2-VL: text keys
    at top level) or list only non-default text keys (LLaVA); transformers fills them in."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise UsageError(f"{folder} has no config.json", "pass a transformers checkpoint folder")
    raw = json.loads(path.read_text())
    if "hidden_size" in (raw.get("text_config") or {}):
        return raw
    from transformers import AutoConfig

    full = AutoConfig.from_pretrained(folder).to_dict()
    return {**full, **{k: v for k, v in raw.items() if k not in full and k not in
                       full["text_config"]}}


def prefix_renamer(rules: list[tuple[str, str]], skip: tuple[str, ...] = ()):
    """A rename function: the first matching (prefix -> replacement) rule wins; names matching
    no rule, or starting with a `skip` prefix, are dropped."""

    def rename(raw: str) -> str | None:
        if raw.startswith(skip):
            return None
        for prefix, repl in rules:
            if raw.startswith(prefix):
                return repl + raw[len(prefix):]
        return None

    return rename


# LLaVA-style checkpoints (LLaVA, Gemma 3): hub files keep `language_model.*` and
# `vision_tower.vision_model.*`; transformers 5 saves `model.language_model.*` and
# `model.vision_tower.*`. Both map to one naming.
LLAVA_STYLE_TEXT = [
    ("language_model.model.", "model."), ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
]
LLAVA_STYLE_VISION = [
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
