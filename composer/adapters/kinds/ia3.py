"""IA3: the weight's input columns or output rows scaled. LyCORIS (kohya spelling) stores ``weight`` (the
multiplier minus 1) and ``on_input``, and merges into the weight only; PEFT stores ``ia3_l`` (the multiplier
itself), scales the bias too when it scales outputs, and names the modules whose inputs it scales in its
config's ``feedforward_modules``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NoFactors, PeftLayer, broadcast, need


@dataclass(eq=False)
class IA3Delta(NoFactors):
    """``scale_vec``: the multiplier itself; ``scale_bias``: an output scaling also scales the bias (PEFT)."""

    scale_vec: torch.Tensor
    on_input: bool = False
    scale_bias: bool = False
    kind = "ia3"
    label_ = "IA3"
    action = "scales"
    kohya_suffixes = ("weight", "on_input")
    peft_suffixes = ("ia3_l",)

    @property
    def in_width(self) -> int:
        return int(self.scale_vec.numel()) if self.on_input else -1

    def dense(self, weight, bias=None):
        axis = 1 if self.on_input else 0
        s = broadcast(self.scale_vec.reshape(-1), weight, axis) - 1.0
        db = None
        if self.scale_bias and not self.on_input and bias is not None:
            db = bias.float() * (self.scale_vec.float().reshape(-1) - 1.0)
        return weight.float() * s, db

    def check(self, shape):
        want = shape[1] if self.on_input else shape[0]
        if self.scale_vec.numel() != want:
            side = "inputs" if self.on_input else "outputs"
            return f"IA3 vector has {self.scale_vec.numel()} values, layer has {want} {side}"
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale_vec}

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> IA3Delta:
        vec = need(name, parts, "weight")
        on_input = bool(need(name, parts, "on_input").reshape(-1)[0].item()) if "on_input" in parts else False
        return cls(1.0 + vec.float().reshape(-1), on_input=on_input, scale_bias=False)

    @classmethod
    def from_peft(cls, name: str, parts: dict, layer: PeftLayer, inner=None) -> IA3Delta:
        vec = parts["ia3_l"]
        names = layer.config.get("feedforward_modules")
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            feedforward = any(layer.rel == n or layer.rel.endswith("." + n) for n in names)
        else:  # Linear: [out, 1] scales outputs, [1, in] inputs; conv: outputs unless told
            feedforward = vec.dim() == 2 and vec.shape[0] == 1 and vec.shape[1] > 1
        return cls(vec.float().reshape(-1), on_input=bool(feedforward), scale_bias=not feedforward)
