"""load(): one path from a model name to (model, processor, adapter).

`tiny:<family>` and `random:<preset>` models are built, saved to a cache folder and then loaded from it exactly
like a local checkpoint; hub ids are resolved to a local snapshot first. So every model
goes through the same from_pretrained code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm import __version__
from edgevlm.adapters import ArchAdapter, adapter_for_config
from edgevlm.errors import ModelNotFoundError, UsageError

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# Hub checkpoints of these families keep CLIP/SigLIP weights under vision_model.*;
# transformers saves from-config models without it. Tiny checkpoints mimic the hub.
HUB_VISION_PREFIX = {"llava": "vision_tower.", "gemma3": "vision_tower."}


@dataclass
class LoadedVLM:
    """A loaded model with everything needed to run it."""

    model: Any
    processor: Any
    adapter: ArchAdapter
    name: str  # what the user asked for
    path: Path  # local folder it was loaded from

    @property
    def config(self):
        return self.model.config

    def fingerprint(self) -> str:
        return model_fingerprint(self.path)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEVLM_CACHE", Path.home() / ".cache" / "edgevlm"))


def model_fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint: config plus the safetensors headers (names, shapes,
    dtypes, offsets) and sizes — changes whenever the weights' layout or bytes change size,
    without reading gigabytes."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("*.json")) + sorted(Path(path).glob("*.safetensors")):
        if file.suffix == ".json":
            digest.update(file.read_bytes())
            continue
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(header_len))
            fh.seek(0, os.SEEK_END)
            # Tail bytes catch same-shaped weights with different values.
            fh.seek(max(8 + header_len, fh.tell() - 4096))
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def materialize_tiny(name: str, seed: int = 0, root: Path | None = None) -> Path:
    """Build a tiny: or random: model and save it as a hub-style checkpoint folder (cached)."""
    import transformers

    from edgevlm.tiny import build_tiny, resolve_builtin

    family, _, label = resolve_builtin(name)
    root = Path(root or cache_dir() / "tiny")
    target = root / f"{label}-seed{seed}-{_tiny_code_hash()}-tf{transformers.__version__}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{label}-", dir=root))
    try:
        model, processor = build_tiny(name, seed=seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        from edgevlm.tiny.presets import real_files

        for file in real_files(name):  # the real model's own config, tokenizer, processor
            shutil.copyfile(file, tmp / file.name)
        if family in HUB_VISION_PREFIX:
            _rename_vision_keys(tmp / "model.safetensors", HUB_VISION_PREFIX[family])
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tiny_code_hash() -> str:
    """Cache key part that changes whenever the tiny-model code does."""
    import edgevlm.tiny

    digest = hashlib.sha256(__version__.encode())
    for file in sorted(Path(edgevlm.tiny.__file__).parent.glob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:10]


def _rename_vision_keys(file: Path, prefix: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    renamed = {
        (prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) else k): v
        for k, v in tensors.items()
    }
    save_file(renamed, file, metadata={"format": "pt"})


def resolve(name: str, seed: int = 0) -> Path:
    """A local checkpoint folder for a tiny/random/trained name, a local path or a hub id."""
    if name.startswith(("tiny:", "random:")):
        return materialize_tiny(name, seed=seed)
    if name.startswith("trained:"):
        from edgevlm.trained import resolve_trained

        return resolve_trained(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model path '{name}' is a file, not a checkpoint folder",
                                     "pass the folder that holds config.json")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"'{name}' has no config.json: not a transformers checkpoint",
                                     "pass a folder saved with save_pretrained, a hub id, or tiny:<family>")
        return path
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise ModelNotFoundError(f"model path '{name}' does not exist",
                                 "check the path, or use a hub id (org/name) or tiny:<family>")
    return _snapshot(name)


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        error = "HF_HUB_OFFLINE=1 is set"
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        except Exception as exc:  # network, auth, missing repo: all end the same way
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise ModelNotFoundError(
        f"cannot get model '{repo_id}': not in the local Hugging Face cache and the hub is "
        f"unreachable ({error})",
        "download it on a machine with network access (huggingface-cli download "
        f"{repo_id}) and pass the folder, or try offline with --model tiny:smolvlm",
    )


def load(name: str = DEFAULT_MODEL, *, device: str = "cpu", device_map: str | None = None,
         dtype: str = "float32", seed: int = 0, attn_implementation: str | None = None) -> LoadedVLM:
    """Load a VLM by tiny name, local folder or hub id (safetensors only, no remote code)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from edgevlm.processors import load_processor

    path = resolve(name, seed=seed)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        raise UsageError(f"cannot read {path}/config.json: {exc}",
                         "is this a transformers checkpoint of a supported VLM?") from exc
    adapter = adapter_for_config(config)
    _check_processor_files(path)
    kwargs = dict(trust_remote_code=False, use_safetensors=True, dtype=getattr(torch, dtype))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(device)
    model.eval()
    processor = load_processor(path, adapter)
    vlm = LoadedVLM(model=model, processor=processor, adapter=adapter, name=name, path=Path(path))
    from edgevlm.freeze import FREEZE_CONFIG_KEY, install

    if getattr(model.config, FREEZE_CONFIG_KEY, None):
        install(vlm)  # ShortV freeze recorded in config.json (stock from_pretrained ignores it)
    return vlm


def _check_processor_files(path: Path) -> None:
    groups = [("tokenizer_config.json", "tokenizer.json"),
              ("processor_config.json", "preprocessor_config.json")]
    missing = [" or ".join(g) for g in groups if not any((path / f).exists() for f in g)]
    if missing:
        raise ModelNotFoundError(
            f"{path} lacks processor files: {'; '.join(missing)}",
            "save the processor next to the model (processor.save_pretrained(folder))",
        )
