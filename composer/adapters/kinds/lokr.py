"""LoKr (LyCORIS, PEFT): ``scale * kron(W1, W2)``, ``W1`` given as ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``,
``W2`` as ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` or the Tucker ``einsum(lokr_t2, lokr_w2_a, lokr_w2_b)``.
``scale`` is ``alpha / r`` (r: the low-rank side's rank); 1 when both sides are full (kohya, as LyCORIS and
ComfyUI); PEFT always scales by its config's ``alpha / r``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import LayerDelta
from .base import KindDelta, KindError, PeftLayer, alpha_scale, dims, flat, low_rank, match, shaped, tucker_down

SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(eq=False)
class LoKrDelta(KindDelta):
    """A conv ``W2`` is flattened to ``[c, d * kh * kw]``: ``kron`` of the flattened factors, reshaped to
    ``(a*c, b*d, kh, kw)``, is the conv kernel (LyCORIS's and PEFT's layout)."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale_: float = 1.0
    kind = "lokr"
    label_ = "LoKr"
    kohya_suffixes = SUFFIXES
    peft_suffixes = SUFFIXES

    def _sides(self):
        if self.w1 is not None:
            u1, v1 = low_rank(self.w1.float())
        else:
            u1, v1 = self.w1a.float(), flat(self.w1b)
        if self.w2 is not None:
            u2, v2 = low_rank(flat(self.w2))
        elif self.t2 is not None:
            u2, v2 = self.w2a.float().t(), tucker_down(self.t2, self.w2b)
        else:
            u2, v2 = self.w2a.float(), flat(self.w2b)
        return u1, v1, u2, v2

    def known_shape(self):
        a, b = self.w1.shape if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])
        if self.w2 is not None and self.w2.dim() == 4:
            return (a * self.w2.shape[0], b * self.w2.shape[1], *self.w2.shape[2:])
        if self.t2 is not None:
            return (a * self.w2a.shape[1], b * self.w2b.shape[1], *self.t2.shape[2:])
        if self.w2b is not None and self.w2b.dim() == 4:
            return (a * self.w2a.shape[0], b * self.w2b.shape[1], *self.w2b.shape[2:])
        return None

    def exact(self, shape=None) -> LayerDelta:
        """``kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)``."""
        u1, v1, u2, v2 = self._sides()
        c = torch.Tensor.contiguous
        return shaped(torch.kron(c(v1), c(v2)), torch.kron(c(u1), c(u2)), self.scale_, shape)

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None, peft_rank: int | None = None):
        """``peft_rank``: PEFT's config ``r`` (PEFT scales by ``alpha / r`` even when both sides are full)."""
        w1, w2, t2 = parts.get("lokr_w1"), parts.get("lokr_w2"), parts.get("lokr_t2")
        if w1 is None:
            w1a, w1b = dims(name, parts, "lokr_w1_a", (2,)), dims(name, parts, "lokr_w1_b", (2,))
            match(name, "rank", w1a.shape[1], w1b.shape[0], "lokr_w1_a", "lokr_w1_b")
        else:
            w1a = w1b = None
            if w1.dim() != 2:
                raise KindError(f"key {name}.lokr_w1: expected a 2-D tensor, got shape {tuple(w1.shape)}")
        if w2 is None:
            w2a = dims(name, parts, "lokr_w2_a", (2,))
            w2b = dims(name, parts, "lokr_w2_b", (2, 4) if t2 is None else (2,))
            if t2 is not None:
                if t2.dim() < 3:
                    raise KindError(f"key {name}.lokr_t2: expected a Tucker core [r, r, kh, kw], got {tuple(t2.shape)}")
                match(name, "rank", t2.shape[0], w2a.shape[0], "lokr_t2", "lokr_w2_a")
                match(name, "rank", t2.shape[1], w2b.shape[0], "lokr_t2", "lokr_w2_b")
            else:
                match(name, "rank", w2a.shape[1], w2b.shape[0], "lokr_w2_a", "lokr_w2_b")
        else:
            w2a = w2b = None
            if w2.dim() not in (2, 4):
                raise KindError(f"key {name}.lokr_w2: expected a 2-D or 4-D tensor, got shape {tuple(w2.shape)}")
        if peft_rank is not None:
            scale = alpha_scale(name, alpha, peft_rank)
        elif w1b is not None:
            scale = alpha_scale(name, alpha, int(w1b.shape[0]))
        elif w2b is not None:
            scale = alpha_scale(name, alpha, int(w2b.shape[0]))
        else:
            scale = 1.0  # both sides full: LyCORIS ignores alpha
        return cls(w1=w1, w1a=w1a, w1b=w1b, w2=w2, w2a=w2a, w2b=w2b, t2=t2, scale_=scale)

    @classmethod
    def from_peft(cls, name: str, parts: dict, layer: PeftLayer, inner=None) -> LoKrDelta:
        rank = layer.rank
        if rank is None:
            for s in ("lokr_w1_b", "lokr_w2_b"):
                if s in parts:
                    rank = int(parts[s].shape[0])
                    break
        return cls.from_kohya(name, parts, layer.alpha if layer.alpha is not None else rank, peft_rank=rank)
