"""Where a file or a result came from: file hashes and installed package versions. Torch-free,
so the export side (manifest.json) and the device side (open_export, bench) share one
definition of each."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of `names`, in that order; packages that are not installed are
    skipped. "edgevlm" is this source tree's own version."""
    from edgevlm import __version__

    versions = {}
    for name in names:
        if name == "edgevlm":  # the running code, even from an unreinstalled checkout
            versions[name] = __version__
            continue
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
