"""The one canonical in-memory form of a LoRA adapter, whatever file format it came from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from typing import ClassVar, Protocol

from ..vocab import FAMILIES  # noqa: F401 (re-exported: the families we tell apart from keys and shapes)


class Delta(Protocol):
    """What every layer delta answers, whatever its kind, so code reads attributes instead of probing types.

    ``kind``: ``"lora"``, ``"loha"``, ``"lokr"``, ``"full"``, ``"dora"``, ``"ia3"``, ``"glora"``, ``"oft"``,
    ``"shira"`` or a kind registered since; ``additive``: the patched weight is ``W + delta`` (False where the
    kind rescales, rotates or renormalises ``W``: DoRA, IA3, GLoRA, OFT); ``is_sparse``: SHiRA's scattered
    entries (no rank columns, attached by a scatter: see :class:`SparseDelta`); ``is_conv``: it patches a
    Conv2d; ``label``: what a user calls the method; ``in_width``: the input width its tensors tell (-1: none);
    ``targets``: the ``torch.nn`` module classes it patches (``Linear``, ``Conv2d``; norm layers for LyCORIS norms).

    Dense deltas (every kind but SHiRA) also answer, for a Linear or Conv2d weight of shape ``(out, in, *k)``:
    ``factors(shape)`` (the exact low-rank :class:`LayerDelta` the runtime stacks, or None), ``dense(weight,
    bias)`` (``(dW, db)`` at weight 1, taken against the base weight), ``check(shape)`` (why it cannot patch a
    weight of that shape, or None). Every delta gives ``tensors()``. :class:`LayerDelta`, :class:`SparseDelta`
    and the kinds of :mod:`.kinds` implement it.
    """

    kind: str
    additive: bool
    is_sparse: bool

    @property
    def is_conv(self) -> bool: ...

    @property
    def label(self) -> str: ...

    @property
    def in_width(self) -> int: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...


@dataclass
class LayerDelta:
    """Low-rank delta ``scale * up @ down`` for one Linear or Conv2d module.

    ``down`` is ``[r, in]`` (Linear) or ``[r, in, kh, kw]`` (Conv2d); ``up`` is ``[out, r]`` or
    ``[out, r, 1, 1]``. ``alpha`` follows the kohya/PEFT convention: the delta is scaled by ``alpha / r``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    kind: ClassVar[str] = "lora"
    additive: ClassVar[bool] = True
    is_sparse: ClassVar[bool] = False
    targets: ClassVar[tuple[str, ...]] = ("Linear", "Conv2d")
    linear: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def label(self) -> str:
        return "LoCon" if self.is_conv else "LoRA"

    @property
    def in_width(self) -> int:
        return int(self.down.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"down": self.down, "up": self.up}

    def factors(self, shape=None) -> LayerDelta:
        """Itself, flattened conv factors (a LoHa/LoKr/full layer re-factored) shaped for a conv ``shape``."""
        if shape is not None and len(shape) == 4 and self.down.dim() == 2:
            down = self.down.reshape(self.down.shape[0], *shape[1:])
            return LayerDelta(down, self.up.reshape(*self.up.shape[:2], 1, 1), self.alpha)
        return self

    def dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        up, down = self.up.reshape(self.up.shape[0], -1).float(), self.down.reshape(self.down.shape[0], -1).float()
        return ((up * self.scale) @ down).reshape(weight.shape), None

    def check(self, shape: tuple) -> str | None:
        """Why the factors cannot patch a Linear (``(out, in)``) or Conv2d (``(out, in, kh, kw)``) weight."""
        down, up = self.down, self.up
        if len(shape) == 2:
            if down.dim() != 2 or up.dim() != 2:
                return f"Linear layer but {down.dim()}-D factors"
        else:
            if down.dim() == 2 and up.dim() == 2 and down.shape[1] == math.prod(shape[1:]):
                # flattened conv factors (a LoHa/LoKr/full layer re-factored): reshaped when attached
                if up.shape[0] != shape[0]:
                    return f"delta has {up.shape[0]} outputs, layer has {shape[0]}"
                return None
            if down.dim() != 4 or up.dim() != 4:
                return f"Conv2d layer but {down.dim()}-D factors"
            if tuple(down.shape[2:]) != tuple(shape[2:]) or tuple(up.shape[2:]) != (1, 1):
                return f"kernel {tuple(down.shape[2:])} does not fit {tuple(shape[2:])}"
        want, got = (shape[1], shape[0]), (down.shape[1], up.shape[0])
        if want != got:
            return f"delta maps {got[0]} -> {got[1]} features, layer has {want[0]} -> {want[1]}"
        return None


@dataclass
class SparseDelta:
    """Sparse (SHiRA) delta ``alpha * D`` of one Linear or Conv2d, ``D[indices[0, i], indices[1, i]] = values[i]``.

    ``indices`` is ``[2, N]`` (row = output feature, column = input feature; PEFT's ``shira_indices``),
    ``values`` ``[N]`` (PEFT's ``shira_weight``), ``shape`` the weight's ``(out, in)`` or, for a Conv2d,
    ``(out, in, kh, kw)``: a conv delta's column indexes the flattened kernel ``(c * kh + i) * kw + j``, so
    ``row * columns + column`` is the position in the weight's contiguous storage for both. ``alpha`` is PEFT's
    ``scaling`` (1 unless set). Fused by a scatter into the weight; the backup is only the overwritten values.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]
    alpha: float = 1.0

    rank = 0  # not low-rank: no rank columns in the stack
    kind: ClassVar[str] = "shira"
    additive: ClassVar[bool] = True
    is_sparse: ClassVar[bool] = True
    targets: ClassVar[tuple[str, ...]] = ("Linear", "Conv2d")

    label: ClassVar[str] = "SHiRA"

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def in_width(self) -> int:
        return int(self.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "values": self.values}

    @property
    def columns(self) -> int:
        """Entries per output row: ``in`` (Linear) or ``in * kh * kw`` (Conv2d)."""
        return math.prod(int(s) for s in self.shape[1:])

    @property
    def scale(self) -> float:
        return float(self.alpha)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / float(self.shape[0] * self.columns)

    def flat_index(self) -> torch.Tensor:
        """Sorted, unique positions ``row * columns + col`` in the flattened weight (duplicates are summed)."""
        return self.coalesced()[0]

    def coalesced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat positions, values)`` sorted with repeated positions summed (fp32)."""
        flat = self.indices[0].long() * self.columns + self.indices[1].long()
        uniq, inv = torch.unique(flat, sorted=True, return_inverse=True)
        if uniq.numel() == flat.numel():
            order = torch.argsort(flat)
            return flat[order], self.values.float()[order]
        vals = torch.zeros(uniq.numel(), dtype=torch.float32).index_add_(0, inv, self.values.float())
        return uniq, vals

    def dense(self) -> torch.Tensor:
        """The full ``alpha * D`` in fp32, shaped like the weight (for conversion and tests)."""
        out = torch.zeros(self.shape[0] * self.columns, dtype=torch.float32)
        flat, vals = self.coalesced()
        out.index_add_(0, flat, vals * self.scale)
        return out.view(*self.shape)


@dataclass
class AdapterMetadata:
    """What a user wants to know about a LoRA besides its weights."""

    trigger_words: list[str] = field(default_factory=list)
    description: str = ""
    preferred_weight: float | None = None
    source_format: str = ""  # "diffusers", "kohya", "bfl", "onetrainer" or "xlabs"
    sha256: str = ""
    file_metadata: dict[str, str] = field(default_factory=dict)  # raw safetensors header metadata

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's short hash of the file (first 12 hex digits of its sha256)."""
        return self.sha256[:12]


@dataclass
class Adapter:
    """A LoRA: per-module deltas keyed by diffusers module path (``unet.down_blocks.0...to_k``,
    ``text_encoder.text_model...q_proj``, ``text_encoder_2...``)."""

    name: str
    family: str
    deltas: dict[str, LayerDelta]
    metadata: AdapterMetadata = field(default_factory=AdapterMetadata)
    path: str | None = None
    # textual inversions bundled in the file (A1111's ``bundle_emb.NAME...``): NAME -> {text encoder: [n, width]}
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def components(self) -> set[str]:
        """Top-level pipeline components this adapter touches (``unet``, ``text_encoder``, ...)."""
        return {key.split(".", 1)[0] for key in self.deltas}

    @property
    def ranks(self) -> set[int]:
        return {d.rank for d in self.deltas.values() if not d.is_sparse}

    @property
    def is_sparse(self) -> bool:
        """True for SHiRA adapters (every delta a :class:`SparseDelta`)."""
        return bool(self.deltas) and all(d.is_sparse for d in self.deltas.values())

    def __repr__(self) -> str:
        ranks = sorted(self.ranks)
        return (
            f"Adapter({self.name!r}, family={self.family!r}, layers={len(self.deltas)}, "
            f"ranks={ranks}, components={sorted(self.components())})"
        )
