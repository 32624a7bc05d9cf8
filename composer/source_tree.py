"""The source tree's folders ``composer/``, ``fusion/``, ``retriever/`` and ``kernels/`` are lora_composer and
its subpackages; their own names belong to other projects (Hugging Face's ``kernels``, which transformers
imports; MosaicML's ``composer``...).

Whenever the repository root is on ``sys.path`` (``python -m pytest``, ``python app.py``, ``python -m bench``,
a Ray worker or a notebook started there), ``import kernels`` would find the folder before the installed
package. Each folder's ``__init__`` therefore checks the name it is imported under and, as a top-level
name, hands the import over to the installed package of that name, or fails as if the folder were not
there. Only ``lora_composer`` (and the tooling folders ``tests`` and ``bench``) resolve from the root.
Standard library only: this runs in the middle of someone else's import.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def _outside(root: Path, entry: str) -> bool:
    return Path(entry or os.curdir).resolve() != root


def defer_to_installed(name: str, init_file: str) -> None:
    """Replace the module being imported as ``name`` (this tree's ``<name>/__init__.py``) with the installed
    package of that name, found on ``sys.path`` without the repository root; ``ModuleNotFoundError`` if none.

    The import system returns what ``sys.modules[name]`` holds once the folder's ``__init__`` has run, so
    the caller gets the installed package.
    """
    root = Path(init_file).resolve().parents[1]
    path = [entry for entry in sys.path if _outside(root, entry)]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} ({root / name} is part of lora_composer, not a package named {name!r})",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
