"""LoRA files in, canonical :class:`Adapter` out (and back to diffusers' format)."""

from .family import detect_family
from .formats import resolve_module
from .io import load_adapter, save_adapter
from .types import FAMILIES, Adapter, AdapterMetadata, LayerDelta

__all__ = [
    "FAMILIES",
    "Adapter",
    "AdapterMetadata",
    "LayerDelta",
    "detect_family",
    "load_adapter",
    "resolve_module",
    "save_adapter",
]
