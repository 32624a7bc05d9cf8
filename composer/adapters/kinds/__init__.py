"""Delta kinds: one file per kind (its key names in kohya and PEFT spelling, its parsing and its math against
the base weight), listed once in :mod:`.registry`.

Built in: LoRA/LoCon (:mod:`.lora`), LoHa, LoKr, full/diff, DoRA, IA3, GLoRA, OFT/BOFT, LyCORIS norms; SHiRA's sparse deltas
come from their own file format (:mod:`lora_composer.adapters.shira`).
"""

from .base import EPS32, Kind, KindDelta, KindError, NoFactors, PeftLayer, tucker_down
from .dora import DoRADelta
from .full import FullDelta
from .glora import GLoRADelta
from .ia3 import IA3Delta
from .loha import LoHaDelta
from .lokr import LoKrDelta
from .norm import NormDelta
from .oft import OFTDelta
from .registry import (
    KINDS,
    NOT_LOADED,
    REGISTRY,
    has_factors,
    kind_label,
    kohya_delta,
    kohya_suffixes,
    peft_delta,
    peft_split,
    peft_suffixes,
    peft_wrap,
    split_peft_key,
)

__all__ = [
    "EPS32",
    "KINDS",
    "NOT_LOADED",
    "REGISTRY",
    "DoRADelta",
    "FullDelta",
    "GLoRADelta",
    "IA3Delta",
    "Kind",
    "KindDelta",
    "KindError",
    "LoHaDelta",
    "LoKrDelta",
    "NoFactors",
    "NormDelta",
    "OFTDelta",
    "PeftLayer",
    "has_factors",
    "kind_label",
    "kohya_delta",
    "kohya_suffixes",
    "peft_delta",
    "peft_split",
    "peft_suffixes",
    "peft_wrap",
    "split_peft_key",
    "tucker_down",
]
