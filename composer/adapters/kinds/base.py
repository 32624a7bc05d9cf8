"""What every kind file builds on: the kind interface the registry reads, the delta base class, shared helpers.

A kind (one file of this package, listed once in :mod:`.registry`) is a class that answers

- ``kind``: its name (``"loha"``...); ``kohya_suffixes`` / ``peft_suffixes``: the tensor names it owns after a
  layer's name, in kohya/LyCORIS spelling (``lora_unet_x.hada_w1_a``) and in PEFT spelling
  (``unet.x.hada_w1_a``); ``wraps``: it is built on another kind's delta (DoRA's magnitude on a LoRA);
- ``from_kohya(name, parts, alpha, inner=None)`` / ``from_peft(name, parts, layer, inner=None)``: the delta of
  one layer (``parts``: suffix -> tensor; ``layer``: :class:`PeftLayer`, what the PEFT config says of it),
  or :class:`KindError` naming the key and the cause.

Its deltas answer the :class:`~lora_composer.adapters.types.Delta` protocol for one Linear or Conv2d weight of
shape ``(out, in, *k)``:

- ``dense(weight, bias)``: ``(dW, db)`` in fp32, what the adapter does at weight 1 (``db`` may be None);
- ``factors(shape)``: the exact ``scale * up @ down`` (:class:`LayerDelta`) the runtime stacks, when the kind
  is additive and low rank and the factors are smaller than the weight, else None (then the runtime adds
  ``dense``);
- ``check(shape)``: why the delta cannot patch a weight of that shape, or None; ``tensors()``: its tensors.

Additive kinds (LoRA, LoHa, LoKr, full) do not depend on the base weight. Multiplicative kinds (DoRA, IA3, OFT,
and GLoRA's ``W0 A`` term) do: their ``dense`` is ``f(W0) - W0`` for the base weight ``W0``, so that at mixing
weight ``w`` every kind acts as

    W = W0 + w * (f(W0) - W0)

(ComfyUI's meaning of a DoRA strength), the same in fused and unfused mode. With several adapters, each
one's ``f`` is taken of the base weight and the results add: ``W = W0 + sum_i w_i (f_i(W0) - W0)``, which
does not depend on their order.

Factor conventions (LyCORIS, PEFT and ComfyUI agree): conv factors are flattened to ``in * kh * kw``
columns and reshaped to the module's weight at the end; Tucker cores ``t`` are ``[r_out, r_in, kh, kw]``
with ``W = einsum("i j ..., i p, j q -> p q ...", t, wa, wb)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...errors import ComposerError
from ..types import LayerDelta

EPS32 = float(torch.finfo(torch.float32).eps)


class KindError(ComposerError, ValueError):
    """One layer's tensors do not make a delta; the message names the key and the cause."""


@dataclass
class PeftLayer:
    """What a PEFT config says of one module: ``alpha``/``rank`` (patterns applied), the whole ``config``
    (OFT's and IA3's settings) and the module path ``rel`` inside its component."""

    alpha: float | None = None
    rank: int | None = None
    config: dict = field(default_factory=dict)
    rel: str = ""


class Kind:
    """The interface the registry reads from a kind's class (see the module docstring)."""

    kind: ClassVar[str] = "?"
    kohya_suffixes: ClassVar[tuple[str, ...]] = ()
    peft_suffixes: ClassVar[tuple[str, ...]] = ()
    wraps: ClassVar[bool] = False

    @classmethod
    def claims(cls, suffixes, spelling: str) -> bool:
        """Whether a layer with these suffixes is this kind's (``spelling``: ``"kohya"`` or ``"peft"``)."""
        own = cls.kohya_suffixes if spelling == "kohya" else cls.peft_suffixes
        return bool(set(suffixes) & set(own))

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None):
        raise KindError(f"layer {name}: {cls.kind} has no kohya spelling")

    @classmethod
    def from_peft(cls, name: str, parts: dict, layer: PeftLayer, inner=None):
        raise KindError(f"layer {name}: {cls.kind} has no PEFT spelling")


# ----------------------------------------------------------------------------------------------- parse helpers


def need(name: str, parts: dict, suffix: str) -> torch.Tensor:
    t = parts.get(suffix)
    if t is None:
        raise KindError(f"layer {name} has no {suffix} (key {name}.{suffix!s} missing)")
    return t


def dims(name: str, parts: dict, suffix: str, allowed: tuple[int, ...]) -> torch.Tensor:
    t = need(name, parts, suffix)
    if t.dim() not in allowed:
        raise KindError(
            f"key {name}.{suffix}: expected a {' or '.join(map(str, allowed))}-D tensor, got shape {tuple(t.shape)}"
        )
    return t


def match(name: str, what: str, a: int, b: int, ka: str, kb: str) -> None:
    if a != b:
        raise KindError(f"key {name}.{kb}: {what} mismatch, {ka} gives {a} but {kb} has {b}")


def finite(name: str, suffix: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise KindError(f"key {name}.{suffix} has NaN or inf values")


def flat_cols(t: torch.Tensor) -> int:
    return int(t.numel() // t.shape[0])


def alpha_scale(name: str, alpha: float | None, rank: int) -> float:
    """``alpha / rank`` (1 without an alpha); a non-finite alpha is refused."""
    if alpha is None:
        return 1.0
    if not math.isfinite(float(alpha)):
        raise KindError(f"key {name}.alpha is {alpha}")
    return float(alpha) / rank


# ----------------------------------------------------------------------------------------------- math helpers


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).float()


def tucker_down(t: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``[r_out, in * kh * kw]``: the Tucker core contracted with its in-side factor ``wb`` (``[r_in, in]``)."""
    k = torch.einsum("i j ..., j q -> i q ...", t.float(), wb.float())
    return k.reshape(k.shape[0], -1)


def shape_error(name: str, got: tuple, shape: tuple) -> str | None:
    out, flat_in = shape[0], math.prod(shape[1:])
    if got != (out, flat_in):
        return f"{name} delta is {got[0]}x{got[1]} (flattened), layer weight is {out}x{flat_in}"
    return None


def low_rank(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V == full`` exactly and the smaller inner size (one side an identity)."""
    m, n = full.shape
    if n <= m:
        return full, torch.eye(n)
    return torch.eye(m), full


def shaped(down: torch.Tensor, up: torch.Tensor, scale: float, shape) -> LayerDelta:
    """A :class:`LayerDelta` with ``scale`` per product, conv factors shaped for ``shape`` when given."""
    rank = int(down.shape[0])
    if shape is not None and len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(up.shape[0], rank, 1, 1)
    return LayerDelta(down=down.contiguous(), up=up.contiguous(), alpha=float(scale) * rank)


def broadcast(vec: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return vec.float().reshape(shape)


def cheaper(f: LayerDelta | None, shape) -> LayerDelta | None:
    """``f`` when its factors are smaller than a weight of ``shape`` (or no shape is given), else None."""
    if f is None or shape is None:
        return f
    out, flat_in = shape[0], math.prod(shape[1:])
    return f if f.rank * (out + flat_in) < out * flat_in else None


# ----------------------------------------------------------------------------------------------- the delta base


class KindDelta(Kind):
    """What every delta of this package shares: not sparse, a name, and the ``(down, up)`` view retrieval and
    fusion read (``scale * up @ down``, 2-D, conv kernels flattened)."""

    is_sparse: ClassVar[bool] = False
    additive: ClassVar[bool] = True
    kind: ClassVar[str] = "lora"
    label_: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = ("Linear", "Conv2d")  # torch.nn module classes it patches
    linear: ClassVar[bool] = True  # weight w acts as w * dense (else dense_at(weight, bias, w) gives it)

    @property
    def label(self) -> str:
        """What a user calls the method (the library's ``LoHa``, ``DoRA``...)."""
        return self.label_ or self.kind

    def exact(self, shape=None) -> LayerDelta | None:
        """The exact low-rank form of an additive kind, whatever its size (None: the kind has none)."""
        return None

    def factors(self, shape=None) -> LayerDelta | None:
        return cheaper(self.exact(shape), shape) if self.additive else None

    def known_shape(self) -> tuple | None:
        """The conv weight shape ``(out, in, kh, kw)`` when the tensors tell it (4-D factors or cores), else
        None: 2-D factors of a conv layer are flattened and its kernel size is known only to the model."""
        return None

    def _view(self) -> LayerDelta:
        view = getattr(self, "_view_cache", None)
        if view is None:
            shape = self.known_shape()
            view = self.exact(shape)
            if view is None:
                dw = self.flat_delta()
                view = shaped(torch.eye(dw.shape[1]), dw, 1.0, shape)
            object.__setattr__(self, "_view_cache", view)
        return view

    @property
    def down(self) -> torch.Tensor:
        return self._view().down

    @property
    def up(self) -> torch.Tensor:
        return self._view().up

    @property
    def scale(self) -> float:
        return self._view().scale

    @property
    def rank(self) -> int:
        return self._view().rank

    @property
    def alpha(self) -> float:
        return self._view().alpha

    @property
    def is_conv(self) -> bool:
        return self._view().is_conv

    @property
    def in_width(self) -> int:
        """The input width its factors tell (-1: they tell none)."""
        return int(self.down.shape[1])

    def flat_delta(self) -> torch.Tensor:
        f = self.exact(None)
        return (f.up.float() * f.scale) @ f.down.float()

    def dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        return self.flat_delta().reshape(weight.shape), None

    def dense_at(self, weight: torch.Tensor, bias: torch.Tensor | None = None, w: float = 1.0):
        """``(dW, db)`` the delta adds at weight ``w``: ``w`` times :meth:`dense` unless the kind is not ``linear``."""
        dw, db = self.dense(weight, bias)
        return w * dw, None if db is None else w * db

    def check(self, shape: tuple) -> str | None:
        return shape_error(self.kind, tuple(self.flat_delta().shape), tuple(shape))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


class NoFactors(KindDelta):
    """A kind that only acts through the base weight (IA3 scales it, OFT rotates it): no ``(down, up)`` view,
    so code reading factors must skip it (``has_factors``); the runtime adds its dense ``f(W0) - W0``."""

    additive: ClassVar[bool] = False
    rank = 0
    is_conv = False
    scale = 1.0
    in_width = -1
    action: ClassVar[str] = "changes"

    def _view(self):
        raise AttributeError(f"an {self.kind.upper()} delta has no low-rank factors (it {self.action} the base weight)")

    down = up = property(lambda self: self._view())
