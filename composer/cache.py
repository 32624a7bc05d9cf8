"""Where lora-composer keeps files it can rebuild (frequency scores, catalogs of read-only libraries)."""

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
