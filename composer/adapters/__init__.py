"""LoRA files in, canonical :class:`Adapter` out (and back to diffusers' format)."""

from .family import detect_family
from .formats import resolve_module
from .io import load_adapter, save_adapter
from .shira import load_shira, save_shira
from .kinds import DoRADelta, FullDelta, IA3Delta, LoHaDelta, LoKrDelta
from .types import FAMILIES, Adapter, AdapterMetadata, LayerDelta, SparseDelta

__all__ = [
    "FAMILIES",
    "Adapter",
    "AdapterMetadata",
    "DoRADelta",
    "FullDelta",
    "IA3Delta",
    "LoHaDelta",
    "LoKrDelta",
    "LayerDelta",
    "SparseDelta",
    "detect_family",
    "load_adapter",
    "load_shira",
    "resolve_module",
    "save_adapter",
    "save_shira",
]
