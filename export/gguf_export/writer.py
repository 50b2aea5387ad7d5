"""Streaming GGUF writer: tensor infos first, then one tensor's data at a time."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgevlm import ui
from edgevlm.export.gguf_export import quantize as q


@dataclass
class TensorJob:
    """One output tensor: its GGUF name, output shape (numpy order) and how to produce it."""

    name: str
    shape: tuple[int, ...]
    load: Callable  # () -> float32 numpy array of `shape`
    keep_f32: bool = False  # norms, embeddings llama.cpp reads as F32
    max_type: str | None = None  # cap (e.g. "F16" for tensors llama.cpp transposes)


@dataclass
class WriteResult:
    types: dict[str, str] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)


def write_gguf(path: Path, arch: str, add_metadata: Callable, jobs: list[TensorJob], main: str,
               block: int, *, progress: bool = False, desc: str = "") -> WriteResult:
    """Write `jobs` to `path` at main type `main`, never holding more than one tensor.

    `add_metadata(writer)` adds the key/values. The file is written under a temporary name
    and renamed at the end, so an interrupted write leaves no finished-looking file.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    result = WriteResult()
    plan = []
    for job in jobs:
        kind, fell_back = q.tensor_type(job.name, job.shape, main, block, keep_f32=job.keep_f32)
        if job.max_type == "F16" and kind not in ("F32", "F16"):
            kind = "F16"
        result.types[job.name] = kind
        if fell_back:
            result.fallback.append(job.name)
        plan.append((job, kind))
    writer = GGUFWriter(None, arch)
    try:
        add_metadata(writer)
        for job, kind in plan:
            writer.add_tensor_info(job.name, job.shape, np.dtype(np.float32), q.nbytes(job.shape, kind),
                                   raw_dtype=GGMLQuantizationType[kind])
        writer.open_output_file(tmp)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for job, kind in ui.progress(plan, desc=desc or path.name, unit="tensor",
                                     enabled=progress):
            data = job.load()
            if tuple(data.shape) != tuple(job.shape):
                raise ValueError(f"{job.name}: produced {data.shape}, planned {job.shape}")
            writer.write_tensor_data(q.encode(data, kind))
            del data
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return result
