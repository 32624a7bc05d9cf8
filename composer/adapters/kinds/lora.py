"""LoRA / LoCon: ``(alpha / r) up @ down`` (the canonical :class:`~lora_composer.adapters.types.LayerDelta`).

kohya spelling ``lora_down.weight`` / ``lora_up.weight`` (+ ``alpha``), with an optional Tucker core
``lora_mid.weight`` folded into the down kernel: ``down' = einsum(mid, down)`` (exact). The PEFT/diffusers
spelling (``lora_A`` / ``lora_B`` and older diffusers names) goes through diffusers' own key converters in
:mod:`..formats`; a LoRA's math (``dense``, ``factors``, ``check``) is :class:`LayerDelta`'s.
"""

from __future__ import annotations

import torch

from ..types import LayerDelta
from .base import Kind, KindError, dims, match

SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


class LoRA(Kind):
    kind = "lora"
    kohya_suffixes = SUFFIXES
    delta = LayerDelta

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> LayerDelta:
        down = dims(name, parts, "lora_down.weight", (2, 4))
        up = dims(name, parts, "lora_up.weight", (2, 4))
        mid = parts.get("lora_mid.weight")
        rank = int(down.shape[0])
        if mid is not None:
            if mid.dim() != 4 or down.dim() != 4:
                raise KindError(f"key {name}.lora_mid.weight: expected 4-D conv kernels, got {tuple(mid.shape)}")
            match(name, "rank", mid.shape[1], rank, "lora_down.weight", "lora_mid.weight")
            match(name, "rank", up.shape[1], mid.shape[0], "lora_mid.weight", "lora_up.weight")
            down = torch.einsum("i j m n, j c -> i c m n", mid.float(), down.reshape(rank, -1).float())
        match(name, "rank", up.shape[1], down.shape[0], "lora_down.weight", "lora_up.weight")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise KindError(f"key {name}.lora_up.weight: {tuple(up.shape)} is not a 1x1 convolution")
        return LayerDelta(down=down, up=up, alpha=float(rank if alpha is None else alpha))
