"""Output folders that appear only when complete: write into a temporary sibling and
rename into place at the end; never overwrite a user's folder without force."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgevlm.errors import OutputExistsError, UsageError


def check_writable(out: Path, force: bool) -> None:
    """Fail early (before any work) if `out` exists without force or cannot be created."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output '{out}' already exists",
                                "pass --force to replace it, or choose another -o folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output '{out}' exists and is not a folder", "choose another -o path")
    parent = out.resolve().parent
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    try:
        tempfile.TemporaryFile(dir=probe_dir).close()
    except OSError as exc:
        raise UsageError(f"cannot write to '{probe_dir}': {exc.strerror}",
                         "choose a writable -o folder") from exc


@contextmanager
def staged_dir(out: str | Path, force: bool = False):
    """Yield a temporary sibling of `out`; on success it replaces `out` atomically.

    On any exception the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out)
    check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
