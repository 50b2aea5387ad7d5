"""Terminal output: progress bars and messages on stderr, silenced by -q; and keeping other
libraries' console chatter out of it. Torch-free: edgevlm.runtimes uses it too."""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout

QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


def progress(iterable=None, *, desc: str = "", total: int | None = None, unit: str = "it",
             enabled: bool = True):
    """tqdm over `iterable` unless quiet or disabled; leaves no bar behind. Without an
    iterable, a bar to .update() by hand (a silent one when quiet or disabled)."""
    from tqdm import tqdm

    if QUIET or not enabled:
        return iterable if iterable is not None else tqdm(total=total, disable=True)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def info(message: str) -> None:
    if not QUIET:
        print(message, file=sys.stderr)


def quiet_transformers():
    """Turn transformers' warnings and progress bars off; returns what turns them back on
    (None without transformers)."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:
        return None
    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()

    def restore():
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
    return restore


@contextmanager
def quieted(*, logs: int | None = None, stdout: bool = False, stderr: bool = False,
            native_stdout: bool = False, transformers: bool = False):
    """Silence other libraries within the block; everything is restored afterwards.
    logs: drop logging records at this level and below. stdout / stderr: Python-level
    writes go to the yielded StringIO (shown only if the caller wants, e.g. on failure).
    native_stdout: file descriptor 1 goes to /dev/null, for C code (llama.cpp's quantizer
    prints a line per tensor) that sys.stdout cannot intercept. transformers: its warnings
    and progress bars off."""
    captured = io.StringIO()
    with ExitStack() as stack:
        if logs is not None:
            previous = logging.root.manager.disable
            logging.disable(logs)
            stack.callback(logging.disable, previous)
        if transformers and (restore := quiet_transformers()):
            stack.callback(restore)
        if native_stdout:
            stack.enter_context(_fd1_to_devnull())
        if stdout:
            stack.enter_context(redirect_stdout(captured))
        if stderr:
            stack.enter_context(redirect_stderr(captured))
        yield captured


@contextmanager
def _fd1_to_devnull():
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
