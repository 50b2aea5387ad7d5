"""Terminal output: progress bars and messages on stderr, silenced by -q."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

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


@contextmanager
def native_stdout_silenced(enabled: bool = True):
    """Send file descriptor 1 to /dev/null: llama.cpp's quantizer prints a line per tensor
    from C, which Python's sys.stdout cannot intercept."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
