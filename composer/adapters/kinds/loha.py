"""LoHa (LyCORIS, PEFT): ``(alpha / r) (W1a W1b) ⊙ (W2a W2b)``; with Tucker cores each product is
``einsum(t, wa, wb)``. Keys ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1`` /
``hada_t2``), the same in both spellings; PEFT's alpha comes from its config (else ``r``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import LayerDelta
from .base import KindDelta, KindError, PeftLayer, alpha_scale, dims, flat, flat_cols, match, need, shaped, tucker_down

SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass(eq=False)
class LoHaDelta(KindDelta):
    """Without cores ``w1a`` is ``[out, r]`` and ``w1b`` ``[r, in * kh * kw]`` (or 4-D); with cores
    ``w1a`` is ``[r, out]``, ``w1b`` ``[r, in]`` and ``t1`` ``[r, r, kh, kw]``. ``scale_`` is ``alpha / r``."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale_: float = 1.0
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "loha"
    label_ = "LoHa"
    kohya_suffixes = SUFFIXES
    peft_suffixes = SUFFIXES

    def _half(self, wa, wb, t):
        if t is None:
            return wa.float().reshape(wa.shape[0], -1), flat(wb)
        return wa.float().t(), tucker_down(t, wb)

    def known_shape(self):
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        if self.w1b.dim() == 4:
            return (self.w1a.shape[0], *self.w1b.shape[1:])
        return None

    def exact(self, shape=None) -> LayerDelta:
        """``(A ⊙ B)`` of two products is a product of Khatri-Rao factors, rank r1*r2."""
        u1, d1 = self._half(self.w1a, self.w1b, self.t1)
        u2, d2 = self._half(self.w2a, self.w2b, self.t2)
        up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
        down = (d1[:, None, :] * d2[None, :, :]).reshape(-1, d1.shape[1])
        return shaped(down, up, self.scale_, shape)

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> LoHaDelta:
        t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
        if (t1 is None) != (t2 is None):
            raise KindError(f"layer {name} has {'hada_t1' if t1 is not None else 'hada_t2'} without its pair")
        tucker = t1 is not None
        w = {s: dims(name, parts, s, (2,) if tucker else (2, 4)) for s in SUFFIXES[:4]}
        for side in ("1", "2"):
            a, b = w[f"hada_w{side}_a"], w[f"hada_w{side}_b"]
            if tucker:
                t = parts[f"hada_t{side}"]
                if t.dim() < 3:
                    raise KindError(
                        f"key {name}.hada_t{side}: expected a Tucker core [r, r, kh, kw], got {tuple(t.shape)}"
                    )
                match(name, "rank", t.shape[0], a.shape[0], f"hada_t{side}", f"hada_w{side}_a")
                match(name, "rank", t.shape[1], b.shape[0], f"hada_t{side}", f"hada_w{side}_b")
            else:
                match(name, "rank", a.shape[1], b.shape[0], f"hada_w{side}_a", f"hada_w{side}_b")
        out1 = w["hada_w1_a"].shape[1 if tucker else 0]
        out2 = w["hada_w2_a"].shape[1 if tucker else 0]
        match(name, "output size", out1, out2, "hada_w1_a", "hada_w2_a")
        match(name, "input size", flat_cols(w["hada_w1_b"]), flat_cols(w["hada_w2_b"]), "hada_w1_b", "hada_w2_b")
        rank = int(w["hada_w1_b"].shape[0])
        return cls(
            w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"], alpha_scale(name, alpha, rank), t1, t2
        )

    @classmethod
    def from_peft(cls, name: str, parts: dict, layer: PeftLayer, inner=None) -> LoHaDelta:
        r = int(need(name, parts, "hada_w1_b").shape[0])
        return cls.from_kohya(name, parts, r if layer.alpha is None else layer.alpha)
