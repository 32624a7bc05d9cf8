"""GLoRA (LyCORIS): ``(alpha / r) (W0 A1 A2 + B1 B2)``, keys ``a1.weight`` ``[in, r]``, ``a2.weight`` ``[r, in]``
(acting on the weight's input axis), ``b1.weight`` ``[out, r]``, ``b2.weight`` ``[r, in * kh * kw]``, ``alpha``;
an optional Tucker core ``bm.weight`` ``[r, r, kh, kw]`` beside a 1x1 ``b2`` (older LyCORIS) is folded into
``b2`` exactly, as Tucker LoCon's is. Linear in ``W0``: it runs as a dense delta taken against the base weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import LayerDelta
from .base import KindDelta, KindError, alpha_scale, dims, flat, match, shape_error, shaped

SUFFIXES = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")


@dataclass(eq=False)
class GLoRADelta(KindDelta):
    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    scale_: float = 1.0
    kind = "glora"
    label_ = "GLoRA"
    additive = False
    kohya_suffixes = SUFFIXES

    def _view(self) -> LayerDelta:  # the part that does not depend on the base weight
        shape = (self.b1.shape[0], *self.b2.shape[1:]) if self.b2.dim() == 4 else None
        return shaped(flat(self.b2), flat(self.b1), self.scale_, shape)

    def dense(self, weight, bias=None):
        w0 = weight.float()
        a = flat(self.a1) @ flat(self.a2)  # [in, in]
        wa = torch.einsum("o i ..., i j -> o j ...", w0, a)
        wb = (flat(self.b1) @ flat(self.b2)).reshape(w0.shape)
        return self.scale_ * (wa + wb), None

    def check(self, shape):
        out, n_in = shape[0], shape[1]
        flat_in = n_in
        for s in shape[2:]:
            flat_in *= s
        if flat(self.a1).shape[0] != n_in or flat(self.a2).shape[1] != n_in:
            return f"GLoRA a1/a2 act on {flat(self.a1).shape[0]} inputs, layer has {n_in}"
        return shape_error(self.kind, (self.b1.shape[0], flat(self.b2).shape[1]), (out, flat_in))

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> GLoRADelta:
        a1, a2, b1, b2 = (dims(name, parts, s, (2, 4)) for s in SUFFIXES[:4])
        match(name, "rank", a1.shape[1], a2.shape[0], "a1.weight", "a2.weight")
        match(name, "input size", a1.shape[0], a2.shape[1], "a1.weight", "a2.weight")
        bm = parts.get("bm.weight")
        if bm is not None:
            if bm.dim() != 4 or b2.dim() != 4 or tuple(b2.shape[2:]) != (1, 1):
                raise KindError(
                    f"key {name}.bm.weight: expected a [r, r, kh, kw] core beside a 1x1 b2, got "
                    f"{tuple(bm.shape)} and b2 {tuple(b2.shape)}"
                )
            match(name, "rank", bm.shape[1], b2.shape[0], "b2.weight", "bm.weight")
            match(name, "rank", b1.shape[1], bm.shape[0], "bm.weight", "b1.weight")
            b2 = torch.einsum("i j m n, j c -> i c m n", bm.float(), b2.reshape(b2.shape[0], -1).float())
        match(name, "rank", b1.shape[1], b2.shape[0], "b1.weight", "b2.weight")
        return cls(a1, a2, b1, b2, alpha_scale(name, alpha, int(a2.shape[0])))
