"""On-disk cache of fitted merge coefficients (strategy ``fit``), so a LoRA set is fitted once.

A fit is keyed by the LoRA files' content hashes (in the set's order), their weights, the base model's
fingerprint and the fit's parameters; the value is one ``[out]`` vector per LoRA and layer, stored as
safetensors with the settings as JSON metadata (never a pickle: a shared cache folder could carry one).
The folder is ``$LORA_COMPOSER_FIT_CACHE``, else ``cache_dir()/fit``, so the CLI, the server and the web
UI of one user reuse each other's fits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from lora_composer.cache import cache_dir

VERSION = 1
_MEMORY: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
_MEMORY_SIZE = 32


def folder() -> Path:
    env = os.environ.get("LORA_COMPOSER_FIT_CACHE")
    return Path(env) if env else cache_dir() / "fit"


def key(identities: list[str], weights: list[tuple[float, float]], model: str, settings: dict) -> str:
    """The cache key: every input the coefficients depend on, hashed."""
    blob = json.dumps(
        {
            "v": VERSION,
            "loras": list(identities),
            "weights": [[round(float(u), 6), round(float(t), 6)] for u, t in weights],
            "model": model,
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def path(k: str) -> Path:
    return folder() / f"{k}.safetensors"


def load(k: str) -> dict[str, torch.Tensor] | None:
    """The coefficients stored under ``k`` (memory first, then disk), or ``None``."""
    from safetensors.torch import load_file

    if k in _MEMORY:
        _MEMORY.move_to_end(k)
        return _MEMORY[k]
    p = path(k)
    if not p.is_file():
        return None
    try:
        found = load_file(str(p))
    except Exception:  # noqa: BLE001 - a truncated or foreign file: fit again
        return None
    _remember(k, found)
    return found


def store(k: str, coefficients: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write atomically (a temporary file renamed), so a reader never sees half a file."""
    from safetensors.torch import save_file

    p = path(k)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    save_file(
        {n: t.detach().float().contiguous() for n, t in coefficients.items()},
        str(tmp),
        metadata={"fit": json.dumps(meta, sort_keys=True)},
    )
    tmp.replace(p)
    _remember(k, coefficients)
    return p


def _remember(k: str, value: dict) -> None:
    _MEMORY[k] = value
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)


def clear_memory() -> None:
    """Forget the in-process copies (the files stay)."""
    _MEMORY.clear()
