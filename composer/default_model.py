"""The default model used when no ``--model`` is given: the mini world (:mod:`lora_composer.miniworld`).

A small text-to-image model trained from scratch on procedurally drawn pictures, with a library of concept
LoRAs it has never seen (star, cross, purple, orange, checkered and wavy backgrounds, outline and pixel
styles, the character "blinky"). It ships with the project, so the first ``compose`` renders a meaningful
picture offline in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_composer.errors import ComposerError
from lora_composer.miniworld import assets

MODEL_NAME = assets.MODEL_NAME


def is_default_model(model: str | os.PathLike) -> bool:
    """Whether ``model`` names the default model (``miniworld`` or its folder)."""
    if os.fspath(model) == MODEL_NAME:
        return True
    try:
        return Path(model).expanduser().resolve() == assets.model_dir()
    except OSError:
        return False


def resolve(model: str | os.PathLike | None, library: str | os.PathLike | None = None) -> tuple[str, str | None]:
    """``(model, library)`` to load: for no model or the default model's name, its folder and (unless a
    library is given) its LoRA library; any other model and library as given."""
    if model is None or is_default_model(model):
        model_dir, default_library = ensure_default_model()
        return str(model_dir), os.fspath(library) if library else str(default_library)
    return os.fspath(model), os.fspath(library) if library else None


def ensure_default_model() -> tuple[Path, Path]:
    """Return ``(model_dir, library_dir)`` of the default model, checking that its files are there."""
    model, library = assets.model_dir(), assets.library_dir()
    if not (model / "model_index.json").is_file():
        raise ComposerError(f"{model}: the default model's files are missing (reinstall lora-composer)")
    if not library.is_dir():
        raise ComposerError(f"{library}: the default model's LoRA library is missing (reinstall lora-composer)")
    return model, library
