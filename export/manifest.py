"""Building manifest.json entries and the tool-version record."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from edgevlm.types import FileEntry


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path, role: str, dtype: str = "") -> FileEntry:
    """A manifest entry for `path`, stored relative to the manifest folder `root`."""
    path = Path(path)
    return FileEntry(role=role, path=path.relative_to(root).as_posix(), sha256=sha256_file(path),
                     bytes=path.stat().st_size, dtype=dtype)


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of edgevlm and the given packages (missing ones are skipped)."""
    from edgevlm import __version__

    versions = {"edgevlm": __version__}
    for name in ("torch", "transformers", *packages):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
