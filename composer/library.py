"""A LoRA library is a folder of adapter files; names are file stems (or, for a file diffusers or PEFT saved
into a folder, the folder's name), matched case-insensitively."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from lora_composer.errors import ComposerError

# Preferred first: a name matching both ``x.safetensors`` and ``x.pt`` resolves to the safetensors file.
from lora_composer.vocab import LORA_EXTENSIONS


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or os.sep in ref or ref.lower().endswith(LORA_EXTENSIONS) or ref.startswith("~")


def _explicit_path(ref: str) -> bool:
    """``/x``, ``./x``, ``../x``, ``~/x``: a file the user points at, never a name in the library."""
    return os.path.isabs(ref) or ref.startswith(("./", "../", "~", ".\\", "..\\"))


# What diffusers' ``save_lora_weights`` and PEFT's ``save_pretrained`` call the file inside a model's folder:
# such a LoRA (as Hugging Face repos ship them) is named after its folder, not after the file.
SAVED_NAMES = ("pytorch_lora_weights", "adapter_model")


def lora_name(path: str | os.PathLike) -> str:
    """A LoRA file's name: its stem (``ink-style``), or its folder's name for a file saved by diffusers or PEFT
    (``ink-style/pytorch_lora_weights.safetensors`` -> ``ink-style``)."""
    path = Path(path)
    if path.stem.lower() in SAVED_NAMES and path.parent.name:
        return path.parent.name
    return path.stem


def saved_file(folder: Path) -> Path | None:
    """The LoRA file a diffusers/PEFT save folder holds (safetensors first), or None."""
    for stem in SAVED_NAMES:
        for ext in LORA_EXTENSIONS:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def list_loras(library: str | os.PathLike | None) -> list[Path]:
    """Every adapter file under ``library`` (recursively), sorted by name then path."""
    if library is None:
        return []
    root = _check_library(library)
    found = [
        p
        for p in root.rglob("*")
        if p.suffix.lower() in LORA_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: (lora_name(p).lower(), str(p)))


def _check_library(library: str | os.PathLike) -> Path:
    root = Path(library).expanduser()
    if not root.exists():
        raise ComposerError(f"LoRA library {root} does not exist")
    if not root.is_dir():
        raise ComposerError(f"LoRA library {root} is not a folder")
    return root


def lora_stem(ref: str) -> str:
    """A LoRA name or path without its file extension: ``star-shape`` for ``star-shape.safetensors``."""
    lower = ref.lower()
    for ext in LORA_EXTENSIONS:
        if lower.endswith(ext):
            return ref[: -len(ext)]
    return ref


def resolve_lora(ref: str | os.PathLike, library: str | os.PathLike | None) -> Path:
    """Turn what a user typed into an adapter file.

    An existing file is used as is. Otherwise ``ref`` is a name (``ink-style``, ``ink-style.safetensors``
    or ``styles/ink-style``) looked up in ``library``: a file under the library whose stem matches
    case-insensitively. Raises :class:`ComposerError` with a one-line message when nothing matches:
    ``PATH: file not found`` for a path (absolute, ``./``, ``../``, ``~``, or not found in the library
    either) and ``unknown LoRA 'NAME' in LIBRARY (did you mean: ...)`` for a name.
    """
    text = os.fspath(ref).strip()
    if not text:
        raise ComposerError("empty LoRA name")
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        saved = saved_file(path)
        if saved is None:
            raise ComposerError(
                f"{path} is a folder with no {' or '.join(n + '.safetensors' for n in SAVED_NAMES)}: give the LoRA file"
            )
        return saved
    if _explicit_path(text) or (library is None and _looks_like_path(text)):
        raise ComposerError(f"{text}: file not found")
    if library is None:
        raise ComposerError(f"unknown LoRA {text!r}: no such file, and no LoRA library given (use --library DIR)")
    root = _check_library(library)
    inside = root / text
    if inside.is_file():
        return inside
    files = list_loras(root)
    want = lora_stem(text).replace("\\", "/").lower()
    if "/" in want:  # a sub-path inside the library: match the relative path without extension
        matches = [
            p
            for p in files
            if p.relative_to(root).with_suffix("").as_posix().lower() == want
            or (lora_name(p) != p.stem and p.parent.relative_to(root).as_posix().lower() == want)
        ]
    else:
        matches = [p for p in files if lora_name(p).lower() == want]
    if matches:
        exact = [p for p in matches if lora_name(p) == Path(lora_stem(text)).name]
        matches = exact or matches
        best_ext = min(LORA_EXTENSIONS.index(p.suffix.lower()) for p in matches)
        matches = [p for p in matches if LORA_EXTENSIONS.index(p.suffix.lower()) == best_ext]
        if len(matches) > 1:
            listed = ", ".join(p.relative_to(root).as_posix() for p in matches)
            raise ComposerError(f"LoRA name {text!r} is ambiguous in {root}: {listed}; give the path")
        return matches[0]
    names = sorted({lora_name(p) for p in files}, key=str.lower)
    if _looks_like_path(text):
        raise ComposerError(
            f"{text}: file not found, and no LoRA of that name in {root} ({_suggest(Path(lora_stem(text)).name, names)})"
        )
    raise ComposerError(f"unknown LoRA {text!r} in {root} ({_suggest(lora_stem(text), names)})")


def _suggest(name: str, names: list[str]) -> str:
    if not names:
        return "the library has no LoRA files"
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)
    if close:
        return "did you mean: " + ", ".join(by_lower[c] for c in close)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return "available: " + shown
