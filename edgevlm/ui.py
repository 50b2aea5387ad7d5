"""Terminal output: progress bars and messages on stderr, silenced by -q."""

from __future__ import annotations

import sys

QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


def progress(iterable, *, desc: str = "", total: int | None = None, enabled: bool = True):
    """tqdm over `iterable` unless quiet or disabled; leaves no bar behind."""
    if QUIET or not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def info(message: str) -> None:
    if not QUIET:
        print(message, file=sys.stderr)
