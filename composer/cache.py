"""Where lora-composer keeps the files it writes: never inside the installed package.

- :func:`cache_dir`: files it can rebuild (frequency scores, activation statistics, the catalogs of libraries
  it may not write to, such as the default model's library inside the package);
- :func:`data_dir`: the user's own files (LoRAs uploaded through the web UI).

``$LORA_COMPOSER_HOME`` moves both (``HOME/`` for the cache, ``HOME/data`` for the data).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LORA_COMPOSER_HOME``, else ``$XDG_CACHE_HOME/lora-composer`` (``~/.cache/lora-composer``)."""
    env = os.environ.get("LORA_COMPOSER_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-composer"


def data_dir() -> Path:
    """``$LORA_COMPOSER_HOME/data``, else ``$XDG_DATA_HOME/lora-composer`` (``~/.local/share/lora-composer``)."""
    env = os.environ.get("LORA_COMPOSER_HOME")
    if env:
        return Path(env) / "data"
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "lora-composer"


def package_dir() -> Path:
    """The installed ``lora_composer`` package folder (``composer/`` in a source tree)."""
    return Path(__file__).resolve().parent


def inside_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies in the installed package (its shipped weights): a place never written to, even
    when the file system would allow it (a development tree, a root-owned site-packages)."""
    try:
        return Path(path).expanduser().resolve().is_relative_to(package_dir())
    except (OSError, ValueError):
        return False
