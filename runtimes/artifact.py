"""Opening an export: its manifest.json, checked before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from edgevlm.errors import UsageError
from edgevlm.runtimes.provenance import sha256_file
from edgevlm.types import ExportArtifact


def manifest_path(target: str | Path) -> Path:
    """Accept the manifest itself or the export folder that holds it."""
    path = Path(target)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists():
        raise UsageError(f"no manifest at {path}",
                         "pass an export folder or its manifest.json (edgevlm export writes it)")
    return path


def open_export(target: str | Path, *, check_hashes: bool = True) -> tuple[ExportArtifact, Path]:
    """(artifact, folder). Refuses a missing, truncated or tampered file before loading it:
    a model that loads wrong is worse than one that does not load."""
    path = manifest_path(target)
    artifact = ExportArtifact.load(path)
    root = path.parent
    for entry in artifact.files:
        file = root / entry.path
        if not file.exists():
            raise UsageError(f"{entry.role} file {file} listed in {path.name} is missing",
                             "copy the whole export folder, or export again")
        if file.stat().st_size != entry.bytes:
            raise UsageError(f"{file} is {file.stat().st_size} bytes, the manifest says "
                             f"{entry.bytes}: truncated or replaced", "copy the file again")
        if check_hashes and sha256_file(file) != entry.sha256:
            raise UsageError(f"{file} does not match its sha256 in {path.name}: modified or "
                             "corrupted", "copy the file again, or export again")
    return artifact, root
