"""Errors a user sees: always one line, naming the file (or name) and the cause.

Every error a user can cause derives from :class:`ComposerError`, so a front end catches one class; those
that are also a ``ValueError`` (a file's or a request's content) say so too. :func:`one_line` is how any
exception is shown in one line.
"""


class ComposerError(Exception):
    """Base class for lora-composer's user-facing errors."""


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc`` (naming the file for an ``OSError`` that does not)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


class AdapterLoadError(ComposerError):
    """A LoRA file could not be read or understood."""

    def __init__(self, path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class AdapterMismatchError(ComposerError):
    """A loaded adapter does not fit the pipeline (family, missing layer, shape)."""

    def __init__(self, name: str, cause: str):
        self.name = name
        self.cause = cause
        super().__init__(f"{name}: {cause}")
