"""LyCORIS norm layers: ``w_norm`` / ``b_norm``, differences added to a LayerNorm's or GroupNorm's weight and
bias (LyCORIS's ``NormModule``: ``weight + w * w_norm``, ``bias + w * b_norm``).

The delta acts on the normalised input: ``norm(x; W0 + w dW, b0 + w db) = norm(x; W0, b0) + w (x̂ dW + db)``.
It has no low-rank factors to read (retrieval, merges and LoRA conversion leave it alone, which is why it is
reported as not additive there); the runtime adds its dense difference, fused or unfused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KindError, NoFactors, dims


@dataclass(eq=False)
class NormDelta(NoFactors):
    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None
    kind = "norm"
    label_ = "norm"
    action = "shifts"
    targets = ("LayerNorm", "GroupNorm")
    kohya_suffixes = ("w_norm", "b_norm")

    def dense(self, weight, bias=None):
        db = None if self.b_norm is None else self.b_norm.float().reshape(-1)
        return self.w_norm.float().reshape(weight.shape), db

    def check(self, shape):
        if len(shape) != 1 or self.w_norm.numel() != shape[0]:
            return f"norm weight diff has {self.w_norm.numel()} values, layer weight is {tuple(shape)}"
        if self.b_norm is not None and self.b_norm.numel() != shape[0]:
            return f"norm bias diff has {self.b_norm.numel()} values, layer has {shape[0]}"
        return None

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> NormDelta:
        w = dims(name, parts, "w_norm", (1,))
        b = parts.get("b_norm")
        if b is not None and (b.dim() != 1 or b.numel() != w.numel()):
            raise KindError(f"key {name}.b_norm: {tuple(b.shape)} does not match w_norm's {tuple(w.shape)}")
        return cls(w, b)
