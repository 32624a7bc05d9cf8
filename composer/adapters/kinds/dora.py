"""DoRA: ``f(W) = m * V / (||V|| + eps)`` with ``V = W + inner`` (``inner`` any additive kind at its scale).

Built on another kind's delta (``wraps``): kohya files add ``dora_scale`` to a LoCon/LoHa/LoKr layer
(LyCORIS: ``[out, 1, ...]``, or ``[1, in, ...]`` for a norm per input column), PEFT files add
``lora_magnitude_vector`` beside ``lora_A`` / ``lora_B`` (per output channel). ``eps`` is LyCORIS's
``finfo(float32).eps`` for kohya files, 0 for PEFT's. Multiplicative: see :mod:`.base` for what weight ``w``
means.

What a weight ``w`` other than 1 means (``scaling``, :data:`SCALINGS`):

- ``"comfy"`` (the default, every file): ``W0 + w (f(W0) - W0)``, ComfyUI's meaning of a DoRA strength; linear in
  ``w``, so it mixes per row and per step as every other kind does.
- ``"peft"``: ``m (W0 + w d) / ||W0 + w d||`` with ``d`` the inner delta, what PEFT and diffusers compute for a
  DoRA LoRA at adapter weight ``w`` (``set_adapters`` scales inside the norm). Not linear in ``w``: the runtime
  recomputes the layer's weight for each weight it meets (fused, or per row unfused).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..types import LayerDelta
from .base import EPS32, KindDelta, KindError, PeftLayer, broadcast, flat, shape_error


@dataclass(eq=False)
class DoRADelta(KindDelta):
    inner: object
    magnitude: torch.Tensor
    eps: float = 0.0
    scaling: str = "comfy"
    kind = "dora"
    label_ = "DoRA"
    additive = False
    wraps = True
    kohya_suffixes = ("dora_scale",)
    peft_suffixes = ("lora_magnitude_vector", "lora_magnitude_vector.weight")

    @property
    def on_input(self) -> bool:
        m = self.magnitude
        return m.dim() >= 2 and m.shape[0] == 1 and m.shape[1] > 1

    def _view(self) -> LayerDelta:  # retrieval reads the direction change
        return self.inner if isinstance(self.inner, LayerDelta) else self.inner._view()

    @property
    def linear(self) -> bool:
        """Whether weight ``w`` acts as ``w * dense`` (``"comfy"``); else :meth:`dense_at` gives each weight's."""
        return self.scaling == "comfy"

    def dense(self, weight, bias=None):
        return self.dense_at(weight, bias, 1.0)

    def dense_at(self, weight, bias=None, w: float = 1.0):
        """``(dW, db)`` that the adapter adds at weight ``w`` under ``"peft"`` scaling (``w * dense`` under
        ``"comfy"``)."""
        if self.scaling == "comfy" and w != 1.0:
            dw, _ = self.dense_at(weight, bias, 1.0)
            return w * dw, None
        w0 = weight.float()
        v = w0 + w * self.inner.dense(w0)[0].reshape(w0.shape)
        axis = 1 if self.on_input else 0
        per = v.transpose(0, axis).reshape(v.shape[axis], -1).norm(dim=1)
        norm = broadcast(per, v, axis) + self.eps
        m = broadcast(self.magnitude.reshape(-1), v, axis)
        return m * v / norm - w0, None

    def check(self, shape):
        inner = self.inner
        if isinstance(inner, LayerDelta):
            why = shape_error("DoRA", (inner.up.shape[0], flat(inner.down).shape[1]), tuple(shape))
        else:
            why = inner.check(shape)
        if why:
            return why
        want = shape[1] if self.on_input else shape[0]
        if self.magnitude.numel() != want:
            side = "inputs" if self.on_input else "outputs"
            return f"DoRA magnitude has {self.magnitude.numel()} values, layer has {want} {side}"
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.tensors(), "magnitude": self.magnitude}

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> DoRADelta:
        if inner is None or not inner.additive:
            raise KindError(
                f"key {name}.dora_scale: DoRA needs a LoCon, LoHa or LoKr layer, this one is "
                f"{'empty' if inner is None else inner.kind}"
            )
        return cls(inner, parts["dora_scale"], eps=EPS32)

    @classmethod
    def from_peft(cls, name: str, parts: dict, layer: PeftLayer, inner=None) -> DoRADelta:
        if not isinstance(inner, LayerDelta):
            raise KindError(f"layer {name} has lora_magnitude_vector (DoRA) but no lora_A/lora_B weights")
        magnitude = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
        return cls(inner, magnitude.reshape(-1), eps=0.0)  # PEFT normalises per output channel, whatever the shape


SCALINGS = ("comfy", "peft")


def with_scaling(deltas: dict, scaling: str) -> dict:
    """``deltas`` with every DoRA layer read with ``scaling`` (:data:`SCALINGS`; see the module docstring)."""
    if scaling not in SCALINGS:
        raise KindError(f"dora_scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    return {k: replace(d, scaling=scaling) if isinstance(d, DoRADelta) else d for k, d in deltas.items()}
