"""Errors a user sees: always one line, naming the file (or name) and the cause."""


class ComposerError(Exception):
    """Base class for lora-composer's user-facing errors."""


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
