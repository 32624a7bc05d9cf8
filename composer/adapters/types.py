"""The one canonical in-memory form of a LoRA adapter, whatever file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Families we can tell apart from keys and shapes.
FAMILIES = ("sd15", "sd2", "sdxl", "flux", "unknown")


@dataclass
class LayerDelta:
    """Low-rank delta ``scale * up @ down`` for one Linear or Conv2d module.

    ``down`` is ``[r, in]`` (Linear) or ``[r, in, kh, kw]`` (Conv2d); ``up`` is ``[out, r]`` or
    ``[out, r, 1, 1]``. ``alpha`` follows the kohya/PEFT convention: the delta is scaled by ``alpha / r``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4


@dataclass
class AdapterMetadata:
    """What a user wants to know about a LoRA besides its weights."""

    trigger_words: list[str] = field(default_factory=list)
    description: str = ""
    preferred_weight: float | None = None
    source_format: str = ""  # "diffusers" or "kohya"
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

    def components(self) -> set[str]:
        """Top-level pipeline components this adapter touches (``unet``, ``text_encoder``, ...)."""
        return {key.split(".", 1)[0] for key in self.deltas}

    @property
    def ranks(self) -> set[int]:
        return {d.rank for d in self.deltas.values()}

    def __repr__(self) -> str:
        ranks = sorted(self.ranks)
        return (
            f"Adapter({self.name!r}, family={self.family!r}, layers={len(self.deltas)}, "
            f"ranks={ranks}, components={sorted(self.components())})"
        )
