"""full / diff (LyCORIS): a dense weight difference ``diff``, optionally a bias difference ``diff_b``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KindDelta, KindError, dims, flat, shape_error


@dataclass(eq=False)
class FullDelta(KindDelta):
    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    kind = "full"
    label_ = "full"
    kohya_suffixes = ("diff", "diff_b")

    def known_shape(self):
        return tuple(self.diff.shape) if self.diff.dim() == 4 else None

    def flat_delta(self) -> torch.Tensor:
        return flat(self.diff)

    def dense(self, weight, bias=None):
        db = None if self.diff_b is None else self.diff_b.float().reshape(-1)
        return self.diff.float().reshape(weight.shape), db

    def check(self, shape):
        why = shape_error(self.kind, tuple(self.flat_delta().shape), tuple(shape))
        if why is None and self.diff_b is not None and self.diff_b.numel() != shape[0]:
            why = f"bias diff has {self.diff_b.numel()} values, layer has {shape[0]} outputs"
        return why

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> FullDelta:
        diff = dims(name, parts, "diff", (2, 4))
        diff_b = parts.get("diff_b")
        if diff_b is not None and diff_b.numel() != diff.shape[0]:
            raise KindError(f"key {name}.diff_b: {diff_b.numel()} values for {diff.shape[0]} outputs")
        return cls(diff, diff_b)
