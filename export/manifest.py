"""Building manifest.json: file entries, the tool-version record, and what the exported
checkpoint's config.json says about its history (plan, recovery, name)."""

from __future__ import annotations

import json
from pathlib import Path

from edgevlm.runtimes.provenance import package_versions, sha256_file
from edgevlm.types import FileEntry, PrunePlan


def file_entry(root: Path, path: Path, role: str, dtype: str = "") -> FileEntry:
    """A manifest entry for `path`, stored relative to the manifest folder `root`."""
    path = Path(path)
    return FileEntry(role=role, path=path.relative_to(root).as_posix(), sha256=sha256_file(path),
                     bytes=path.stat().st_size, dtype=dtype)


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of edgevlm and the given packages (missing ones are skipped)."""
    return package_versions("edgevlm", "torch", "transformers", *packages)


def checkpoint_records(model_dir: Path) -> tuple[PrunePlan | None, dict | None, str]:
    """(plan, recovery record, name) of the checkpoint folder an export is made from: the
    manifest takes them from its config.json, the one record of what was done to it, so
    every path that exports a checkpoint writes the same plan."""
    from edgevlm.plan import plan_from_config
    from edgevlm.recovery.heal import RECOVERY_CONFIG_KEY

    config = json.loads((Path(model_dir) / "config.json").read_text())
    recovery = config.get(RECOVERY_CONFIG_KEY)
    if recovery:  # the per-step losses stay with the checkpoint
        recovery = {k: v for k, v in recovery.items() if k != "losses"}
    name = str(config.get("_name_or_path") or Path(model_dir).resolve().name)
    return plan_from_config(config), recovery or None, name
