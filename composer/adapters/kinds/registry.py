"""The one list of delta kinds, and the two functions that turn one layer's tensors into a delta with it.

A new kind is one file of this package (a :class:`~.base.Kind` with its key names, parsing and math) and one
line in :data:`REGISTRY`. The order is the order of detection: the first kind that claims a layer's tensor
names parses it; kinds that ``wrap`` another (DoRA) are applied after it, on its delta.
"""

from __future__ import annotations

from .base import KindError, PeftLayer
from .dora import DoRADelta
from .full import FullDelta
from .glora import GLoRADelta
from .ia3 import IA3Delta
from .loha import LoHaDelta
from .lokr import LoKrDelta
from .lora import LoRA
from .norm import NormDelta
from .oft import OFTDelta

REGISTRY: list = [
    LoHaDelta,
    LoKrDelta,
    LoRA,
    OFTDelta,
    GLoRADelta,
    FullDelta,
    IA3Delta,
    NormDelta,
    DoRADelta,
]

KINDS = tuple(k.kind for k in REGISTRY)  # the built-in kinds (SHiRA aside)

# Key fragments of methods that are recognised but not loaded: (fragment, what it is).
NOT_LOADED = (
    ("oft_diag", "OFT (oft_diag)"),
    (".oft_r", "PEFT OFT from before PEFT 0.14 (oft_r; PEFT itself no longer loads it)"),
)


def kohya_suffixes() -> frozenset[str]:
    """Every tensor name after a kohya layer name that some kind reads (and ``alpha``)."""
    return frozenset({"alpha"}.union(*(k.kohya_suffixes for k in REGISTRY)))


def peft_suffixes() -> tuple[str, ...]:
    """Every tensor name after a PEFT module path that some kind reads (besides LoRA's ``lora_A`` / ``lora_B``),
    longest first (so ``x.lora_magnitude_vector.weight`` is not read as ``weight``)."""
    return tuple(sorted({s for k in REGISTRY for s in k.peft_suffixes}, key=lambda s: (-len(s), s)))


def split_peft_key(rel: str) -> tuple[str, str] | None:
    """``(module, suffix)`` of a PEFT key a kind reads, or None."""
    for s in peft_suffixes():
        if rel.endswith("." + s):
            return rel[: -len(s) - 1], s
    return None


def _pick(suffixes: set, spelling: str):
    wrappers = [k for k in REGISTRY if k.wraps and k.claims(suffixes, spelling)]
    own = set().union(*((w.kohya_suffixes if spelling == "kohya" else w.peft_suffixes) for w in wrappers))
    rest = suffixes - own
    base = next((k for k in REGISTRY if not k.wraps and k.claims(rest, spelling)), None) if rest else None
    return base, wrappers, own


def kohya_delta(name: str, parts: dict, alpha: float | None):
    """The delta one kohya-named layer's tensors make (``parts``: suffix -> tensor, ``alpha`` already read)."""
    suffixes = set(parts) - {"alpha"}
    known = kohya_suffixes()
    odd = sorted(s for s in suffixes if s not in known)
    if odd:
        raise KindError(f"unknown key format (key {name}.{odd[0]!r})")
    base, wrappers, own = _pick(suffixes, "kohya")
    if base is None:
        raise KindError(f"layer {name} has only {', '.join(sorted(suffixes)) or 'an alpha'}")
    delta = base.from_kohya(name, {s: t for s, t in parts.items() if s not in own}, alpha)
    for w in wrappers:
        delta = w.from_kohya(name, parts, alpha, inner=delta)
    return delta


def peft_split(parts: dict) -> tuple[dict, dict]:
    """``(own, wrapping)``: a PEFT module's tensors of a kind of its own, and those of kinds that wrap another
    kind's delta (DoRA's magnitude on the module's LoRA), which :func:`peft_wrap` applies once that exists."""
    wrapping = {s for k in REGISTRY if k.wraps for s in k.peft_suffixes}
    return ({s: t for s, t in parts.items() if s not in wrapping}, {s: t for s, t in parts.items() if s in wrapping})


def peft_delta(name: str, parts: dict, layer: PeftLayer | None = None):
    """The delta one PEFT module's tensors of a kind make (LoHa, LoKr, IA3, OFT, BOFT...)."""
    layer = layer or PeftLayer()
    base, _, _ = _pick(set(parts), "peft")
    if base is None:
        raise KindError(f"layer {name}: unknown PEFT tensors {', '.join(sorted(parts))}")
    return base.from_peft(name, parts, layer)


def peft_wrap(name: str, parts: dict, layer: PeftLayer | None, inner):
    """``inner`` (the module's delta, or None) wrapped by the kinds that claim ``parts`` (DoRA)."""
    layer = layer or PeftLayer()
    delta = inner
    for w in (k for k in REGISTRY if k.wraps and k.claims(set(parts), "peft")):
        delta = w.from_peft(name, parts, layer, inner=delta)
    return delta


def has_factors(d) -> bool:
    """Whether a layer delta reads as ``scale * up @ down`` (LoRA, LoCon, LoHa, LoKr, full, DoRA's direction,
    GLoRA's fixed part). IA3 and OFT scale or rotate the base weight and have no factors to read; SHiRA is
    sparse. Code that reads factors (gates, activation statistics, the retriever's weight signal) skips them."""
    if d.is_sparse:
        return False
    try:
        return d.down is not None
    except AttributeError:
        return False


def kind_label(adapter) -> str:
    """What a user calls the adapter's method, from its layers' ``label``: ``LoRA``, ``LoCon`` (LoRA on
    convolutions too), ``LoHa``, ``LoKr``, ``DoRA``, ``IA3``, ``GLoRA``, ``OFT``, ``BOFT``, ``full``, ``SHiRA``;
    several joined by ``+``."""
    seen = list(dict.fromkeys(d.label for d in adapter.deltas.values()))
    if "LoCon" in seen:  # a LoRA that patches a convolution anywhere is a LoCon throughout
        seen = list(dict.fromkeys("LoCon" if s == "LoRA" else s for s in seen))
    return " + ".join(sorted(seen)) or "empty"
