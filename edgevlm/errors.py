"""Error types. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class EdgeVLMError(Exception):
    """Base error: says what went wrong, why, and how to fix it."""

    exit_code = 1

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what}\n  fix: {fix}")


class UsageError(EdgeVLMError):
    """Bad arguments, configuration or input data (exit 2)."""

    exit_code = 2


class ModelNotFoundError(UsageError):
    """A model id or path that cannot be loaded."""


class UnsupportedModelError(UsageError):
    """An architecture or configuration edgevlm does not handle."""


class CalibrationError(UsageError):
    """Unreadable or empty calibration data."""


class OutputExistsError(UsageError):
    """Refusing to overwrite user files without --force."""


class MissingDependencyError(EdgeVLMError):
    """An optional dependency is not installed (exit 3)."""

    exit_code = 3

    def __init__(self, package: str, extra: str, purpose: str, fix: str | None = None):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed",
            fix or f'pip install "edgevlm[{extra}]"  (or: pip install {package})',
        )
        self.package = package


class VerificationError(EdgeVLMError):
    """An export disagrees with the PyTorch model beyond tolerance (exit 1)."""


def require(module: str, extra: str, purpose: str, package: str | None = None):
    """Import an optional dependency or raise MissingDependencyError with an install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(package or module, extra, purpose) from exc
