"""lora-composer: compose many LoRA adapters inside diffusers text-to-image pipelines.

The public names below load on first use (PEP 562), so ``import lora_composer`` stays cheap: no torch, no
diffusers until a name that needs them is touched. Submodules (``lora_composer.tiny``, ``.cli``...) import
as usual.
"""

from __future__ import annotations

if __name__ == "composer":  # top-level `composer` from the repository root: not ours (see source_tree)
    from lora_composer.source_tree import defer_to_installed

    defer_to_installed(__name__, __file__)

import importlib

TYPE_CHECKING = False  # mypy and pyright read this name as typing.TYPE_CHECKING; saves importing typing
if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these load lazily
    from lora_composer.adapters import Adapter, load_adapter, save_adapter
    from lora_composer.errors import AdapterLoadError, AdapterMismatchError, ComposerError
    from lora_composer.fusion import StepPlan, Strategy, get_strategy
    from lora_composer.pipeline import ComposerPipeline
    from lora_composer.pnginfo import GenerationRecord, save_png
    from lora_composer.pnginfo import read_record as read_png
    from lora_composer.retriever import Catalog
    from lora_composer.runtime import LoraRuntime

# public name -> (module, attribute in that module)
_EXPORTS = {
    "ComposerPipeline": ("lora_composer.pipeline", "ComposerPipeline"),
    "load_adapter": ("lora_composer.adapters", "load_adapter"),
    "save_adapter": ("lora_composer.adapters", "save_adapter"),
    "Adapter": ("lora_composer.adapters", "Adapter"),
    "LoraRuntime": ("lora_composer.runtime", "LoraRuntime"),
    "get_strategy": ("lora_composer.fusion", "get_strategy"),
    "Strategy": ("lora_composer.fusion", "Strategy"),
    "StepPlan": ("lora_composer.fusion", "StepPlan"),
    "Catalog": ("lora_composer.retriever", "Catalog"),
    "GenerationRecord": ("lora_composer.pnginfo", "GenerationRecord"),
    "save_png": ("lora_composer.pnginfo", "save_png"),
    "read_png": ("lora_composer.pnginfo", "read_record"),  # the GenerationRecord a PNG carries
    "ComposerError": ("lora_composer.errors", "ComposerError"),
    "AdapterLoadError": ("lora_composer.errors", "AdapterLoadError"),
    "AdapterMismatchError": ("lora_composer.errors", "AdapterMismatchError"),
}

_FALLBACK_VERSION = "0.1.0"  # pyproject's version, for a source tree that is not installed

__all__ = [  # spelled out: type checkers read it to see the imports above as the public API
    "Adapter",
    "AdapterLoadError",
    "AdapterMismatchError",
    "Catalog",
    "ComposerError",
    "ComposerPipeline",
    "GenerationRecord",
    "LoraRuntime",
    "StepPlan",
    "Strategy",
    "__version__",
    "get_strategy",
    "load_adapter",
    "read_png",
    "save_adapter",
    "save_png",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora-composer")
    except PackageNotFoundError:
        return _FALLBACK_VERSION


def __getattr__(name: str):
    if name == "__version__":
        value = _version()
    elif name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
