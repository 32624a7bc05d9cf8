"""Delta kinds beyond ``(down, up)``: LyCORIS LoHa and LoKr, full/diff, DoRA, IA3, GLoRA, diagonal OFT and BOFT.

Every kind answers the same three questions for one Linear or Conv2d weight of shape ``(out, in, *k)``:

- ``dense(weight, bias)``: ``(dW, db)`` in fp32, what the adapter does at weight 1 (``db`` may be None);
- ``factors(shape)``: an exact :class:`LayerDelta` (``scale * up @ down``) when the kind is additive and has a
  low-rank structure, else None (then the runtime adds ``dense``);
- ``check(shape)``: why the delta cannot patch a weight of that shape, or None.

Additive kinds (LoHa, LoKr, full) do not depend on the base weight. Multiplicative kinds (DoRA, IA3, OFT,
and GLoRA's ``W0 A`` term) do:
their ``dense`` is ``f(W0) - W0`` for the base weight ``W0``, so that at mixing weight ``w`` every kind acts as

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
from dataclasses import dataclass

import torch

from .types import LayerDelta


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).float()


def tucker_down(t: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``[r_out, in * kh * kw]``: the Tucker core contracted with its in-side factor ``wb`` (``[r_in, in]``)."""
    k = torch.einsum("i j ..., j q -> i q ...", t.float(), wb.float())
    return k.reshape(k.shape[0], -1)


def _shape_error(name: str, got: tuple, shape: tuple) -> str | None:
    out, flat_in = shape[0], 1
    for s in shape[1:]:
        flat_in *= s
    if got != (out, flat_in):
        return f"{name} delta is {got[0]}x{got[1]} (flattened), layer weight is {out}x{flat_in}"
    return None


def _low_rank(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V == full`` exactly and the smaller inner size (one side an identity)."""
    m, n = full.shape
    if n <= m:
        return full, torch.eye(n)
    return torch.eye(m), full


class _Kind:
    """What every kind shares: not sparse, a name, and the ``(down, up)`` view other modules read."""

    is_sparse = False
    kind = "lora"
    additive = True

    def factors(self, shape=None) -> LayerDelta | None:  # pragma: no cover - overridden
        return None

    def known_shape(self) -> tuple | None:
        """The conv weight shape ``(out, in, kh, kw)`` when the tensors tell it (4-D factors or cores), else
        None: 2-D factors of a conv layer are flattened and its kernel size is known only to the model."""
        return None

    def _view(self) -> LayerDelta:
        view = getattr(self, "_view_cache", None)
        if view is None:
            shape = self.known_shape()
            view = self.factors(shape)
            if view is None:
                dw = self.flat_delta()
                view = _shaped(torch.eye(dw.shape[1]), dw, 1.0, shape)
            object.__setattr__(self, "_view_cache", view)
        return view

    # The additive delta as ``scale * up @ down`` (2-D, conv kernels flattened): retrieval and fusion read it.
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

    def flat_delta(self) -> torch.Tensor:
        f = self.factors(None)
        return (f.up.float() * f.scale) @ f.down.float()

    def dense(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        return self.flat_delta().reshape(weight.shape), None

    def check(self, shape: tuple) -> str | None:
        return _shape_error(self.kind, tuple(self.flat_delta().shape), tuple(shape))


@dataclass(eq=False)
class LoHaDelta(_Kind):
    """LoHa: ``scale * (W1a W1b) ⊙ (W2a W2b)``; with Tucker cores each product is ``einsum(t, wa, wb)``.

    Without cores ``w1a`` is ``[out, r]`` and ``w1b`` ``[r, in * kh * kw]`` (or 4-D); with cores
    ``w1a`` is ``[r, out]``, ``w1b`` ``[r, in]`` and ``t1`` ``[r, r, kh, kw]``. ``scale`` is ``alpha / r``.
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale_: float = 1.0
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind = "loha"

    def _half(self, wa, wb, t):
        if t is None:
            return wa.float().reshape(wa.shape[0], -1), _flat(wb)
        return wa.float().t(), tucker_down(t, wb)

    def known_shape(self):
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        if self.w1b.dim() == 4:
            return (self.w1a.shape[0], *self.w1b.shape[1:])
        return None

    def factors(self, shape=None) -> LayerDelta:
        """Exact low-rank form: ``(A ⊙ B)`` of two products is a product of Khatri-Rao factors, rank r1*r2."""
        u1, d1 = self._half(self.w1a, self.w1b, self.t1)
        u2, d2 = self._half(self.w2a, self.w2b, self.t2)
        up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
        down = (d1[:, None, :] * d2[None, :, :]).reshape(-1, d1.shape[1])
        return _shaped(down, up, self.scale_, shape)


@dataclass(eq=False)
class LoKrDelta(_Kind):
    """LoKr: ``scale * kron(W1, W2)``, ``W1`` given as ``w1`` or ``w1a @ w1b``, ``W2`` as ``w2``, ``w2a @ w2b``
    or the Tucker ``einsum(t2, w2a, w2b)``. A conv ``W2`` is flattened to ``[c, d * kh * kw]``: ``kron`` of the
    flattened factors, reshaped to ``(a*c, b*d, kh, kw)``, is the conv kernel (LyCORIS's and PEFT's layout).
    """

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale_: float = 1.0
    kind = "lokr"

    def _sides(self):
        if self.w1 is not None:
            u1, v1 = _low_rank(self.w1.float())
        else:
            u1, v1 = self.w1a.float(), _flat(self.w1b)
        if self.w2 is not None:
            u2, v2 = _low_rank(_flat(self.w2))
        elif self.t2 is not None:
            u2, v2 = self.w2a.float().t(), tucker_down(self.t2, self.w2b)
        else:
            u2, v2 = self.w2a.float(), _flat(self.w2b)
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

    def factors(self, shape=None) -> LayerDelta:
        """Exact: ``kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)``."""
        u1, v1, u2, v2 = self._sides()
        c = torch.Tensor.contiguous
        return _shaped(torch.kron(c(v1), c(v2)), torch.kron(c(u1), c(u2)), self.scale_, shape)


def _shaped(down: torch.Tensor, up: torch.Tensor, scale: float, shape) -> LayerDelta:
    """A :class:`LayerDelta` with ``scale`` per product, conv factors shaped for ``shape`` when given."""
    rank = int(down.shape[0])
    if shape is not None and len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(up.shape[0], rank, 1, 1)
    return LayerDelta(down=down.contiguous(), up=up.contiguous(), alpha=float(scale) * rank)


@dataclass(eq=False)
class FullDelta(_Kind):
    """A dense weight difference ``diff`` (LyCORIS full/diff), optionally with a bias difference ``diff_b``."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    kind = "full"

    def known_shape(self):
        return tuple(self.diff.shape) if self.diff.dim() == 4 else None

    def flat_delta(self) -> torch.Tensor:
        return _flat(self.diff)

    def dense(self, weight, bias=None):
        db = None if self.diff_b is None else self.diff_b.float().reshape(-1)
        return self.diff.float().reshape(weight.shape), db

    def check(self, shape):
        why = _shape_error(self.kind, tuple(self.flat_delta().shape), tuple(shape))
        if why is None and self.diff_b is not None and self.diff_b.numel() != shape[0]:
            why = f"bias diff has {self.diff_b.numel()} values, layer has {shape[0]} outputs"
        return why


def _broadcast(vec: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return vec.float().reshape(shape)


@dataclass(eq=False)
class DoRADelta(_Kind):
    """DoRA: ``f(W) = m * V / (||V|| + eps)`` with ``V = W + inner`` (``inner`` any additive kind at its scale).

    The norm is per output row (LyCORIS ``wd_on_out``, PEFT) or per input column (``magnitude`` shaped
    ``[1, in, ...]``). ``eps`` is LyCORIS's ``finfo(float32).eps`` for kohya files, 0 for PEFT's
    ``lora_magnitude_vector``. Multiplicative: see the module docstring for what weight ``w`` means.
    """

    inner: object
    magnitude: torch.Tensor
    eps: float = 0.0
    kind = "dora"
    additive = False

    @property
    def on_input(self) -> bool:
        m = self.magnitude
        return m.dim() >= 2 and m.shape[0] == 1 and m.shape[1] > 1

    def _view(self) -> LayerDelta:  # retrieval reads the direction change
        return self.inner._view() if isinstance(self.inner, _Kind) else self.inner

    def factors(self, shape=None):
        return None

    def dense(self, weight, bias=None):
        w0 = weight.float()
        v = w0 + self.inner_dense(w0)
        axis = 1 if self.on_input else 0
        per = v.transpose(0, axis).reshape(v.shape[axis], -1).norm(dim=1)
        norm = _broadcast(per, v, axis) + self.eps
        m = _broadcast(self.magnitude.reshape(-1), v, axis)
        return m * v / norm - w0, None

    def inner_dense(self, w0: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        if isinstance(inner, LayerDelta):
            return ((inner.up.reshape(inner.up.shape[0], -1).float() * inner.scale) @ _flat(inner.down)).reshape(w0.shape)
        return inner.dense(w0)[0]

    def check(self, shape):
        inner = self.inner
        flat = tuple(_flat(inner.down).shape[1:]) if isinstance(inner, LayerDelta) else None
        if isinstance(inner, LayerDelta):
            why = _shape_error("DoRA", (inner.up.shape[0], flat[0]), tuple(shape))
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
        inner = self.inner
        out = {"down": inner.down, "up": inner.up} if isinstance(inner, LayerDelta) else inner.tensors()
        return {**out, "magnitude": self.magnitude}


class _NoFactors(_Kind):
    """A kind that only acts through the base weight (IA3 scales it, OFT rotates it): no ``(down, up)`` view,
    so code reading factors must skip it (:func:`has_factors`); the runtime adds its dense ``f(W0) - W0``."""

    additive = False
    rank = 0
    is_conv = False
    action = "changes"

    def _view(self):
        raise AttributeError(f"an {self.kind.upper()} delta has no low-rank factors (it {self.action} the base weight)")

    down = up = property(lambda self: self._view())

    def factors(self, shape=None):
        return None


@dataclass(eq=False)
class IA3Delta(_NoFactors):
    """IA3: the weight's input columns or output rows scaled by ``scale`` (the multiplier itself: PEFT's
    ``ia3_l``; LyCORIS stores ``scale - 1``). ``scale_bias``: an output scaling also scales the bias (PEFT)."""

    scale_vec: torch.Tensor
    on_input: bool = False
    scale_bias: bool = False
    kind = "ia3"
    action = "scales"

    def dense(self, weight, bias=None):
        axis = 1 if self.on_input else 0
        s = _broadcast(self.scale_vec.reshape(-1), weight, axis) - 1.0
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


@dataclass(eq=False)
class GLoRADelta(_Kind):
    """GLoRA (LyCORIS): ``scale * (W0 A1 A2 + B1 B2)``, ``A1`` ``[in, r]``, ``A2`` ``[r, in]`` acting on the
    weight's input axis, ``B1`` ``[out, r]``, ``B2`` ``[r, in * kh * kw]``. Linear in ``W0``, so it runs as a
    dense delta taken against the base weight; weight ``w`` gives ``W0 + w * delta(W0)``."""

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    scale_: float = 1.0
    kind = "glora"
    additive = False

    def _view(self) -> LayerDelta:  # the part that does not depend on the base weight
        shape = (self.b1.shape[0], *self.b2.shape[1:]) if self.b2.dim() == 4 else None
        return _shaped(_flat(self.b2), _flat(self.b1), self.scale_, shape)

    def factors(self, shape=None):
        return None

    def dense(self, weight, bias=None):
        w0 = weight.float()
        a = _flat(self.a1) @ _flat(self.a2)  # [in, in]
        wa = torch.einsum("o i ..., i j -> o j ...", w0, a)
        wb = (_flat(self.b1) @ _flat(self.b2)).reshape(w0.shape)
        return self.scale_ * (wa + wb), None

    def check(self, shape):
        out, n_in = shape[0], shape[1]
        flat_in = n_in
        for s in shape[2:]:
            flat_in *= s
        if _flat(self.a1).shape[0] != n_in or _flat(self.a2).shape[1] != n_in:
            return f"GLoRA a1/a2 act on {_flat(self.a1).shape[0]} inputs, layer has {n_in}"
        return _shape_error(self.kind, (self.b1.shape[0], _flat(self.b2).shape[1]), (out, flat_in))


@dataclass(eq=False)
class OFTDelta(_NoFactors):
    """OFT: the weight rotated by block-diagonal orthogonal matrices ``R = (I + Q)(I - Q)^-1`` (Cayley),
    ``Q = B - B^T``; ``rescale`` (``[out, 1, ...]``) scales the output rows after. Multiplicative: ``dense`` is
    ``f(W0) - W0``.

    - Diagonal OFT, ``blocks`` ``[k, b, b]``: ``W' = R^T W`` per block of ``b`` rows (LyCORIS's
      ``oft_blocks``).
    - BOFT, ``blocks`` ``[m, k, b, b]``: ``m`` butterfly stages; stage ``i`` pairs rows ``2^i b / 2`` apart,
      gathers them into blocks of ``b`` and applies ``R_i`` (``W <- R_i W`` per block), as LyCORIS does.

    ``constraint`` (LyCORIS's ``alpha``) times the output size caps ``||Q||``. PEFT's OFT and BOFT rotate the
    layer's input instead (``on_input``: the same, on ``W^T`` flattened to ``[in * kh * kw, out]``), may share
    one block across the axis (``shared``, its ``block_share``) and may replace the inverse by a truncated
    Cayley-Neumann series ``sum_j series[j] Q^j`` (PEFT's ``I + 2Q + 2Q^2 + ...``; empty: the exact inverse)."""

    blocks: torch.Tensor
    rescale: torch.Tensor | None = None
    constraint: float = 0.0  # LyCORIS's alpha: the cap on ||Q|| is constraint * out
    on_input: bool = False
    shared: bool = False
    series: tuple[float, ...] = ()
    kind = "oft"
    action = "rotates"

    @property
    def butterfly(self) -> bool:
        return self.blocks.dim() == 4

    def _rotations(self, size: int) -> torch.Tensor:
        b = self.blocks.float()
        q = b - b.transpose(-1, -2)
        cap = self.constraint * size
        if cap > 0:
            norm = torch.norm(q) + 1e-8
            if norm > cap:
                q = q * cap / norm
        eye = torch.eye(b.shape[-1]).expand_as(q)
        if self.series:
            r, power = self.series[0] * eye, eye
            for c in self.series[1:]:
                power = power @ q
                r = r + c * power
        else:
            r = (eye + q) @ torch.linalg.inv(eye - q)
        if self.shared:
            r = r.expand(size // r.shape[-1], -1, -1)
        return r

    def dense(self, weight, bias=None):
        w0 = weight.float()
        w = w0.reshape(w0.shape[0], -1).t() if self.on_input else w0
        r = self._rotations(w.shape[0])
        if self.butterfly:
            new, bs = w, r.shape[-1]
            for i, stage in enumerate(r):
                k = 2 ** i * (bs // 2)
                new = new.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, bs))
                new = torch.einsum("b i j, b j ... -> b i ...", stage, new)
                new = new.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        else:
            k, bs = r.shape[0], r.shape[1]
            new = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(k, bs, *w.shape[1:])).reshape(w.shape)
        if self.on_input:
            new = new.t().reshape(w0.shape)
        if self.rescale is not None:
            new = self.rescale.float().reshape(-1, *([1] * (w0.dim() - 1))) * new
        return new - w0, None

    def check(self, shape):
        bs = self.blocks.shape[-1]
        size, side = (math.prod(shape[1:]), "inputs") if self.on_input else (shape[0], "outputs")
        k = size // bs if self.shared else self.blocks.shape[-3]
        if k * bs != size or (self.shared and self.blocks.shape[-3] != 1):
            return f"OFT blocks cover {k}x{bs} {side}, layer has {size}"
        if self.butterfly and (bs % 2 or k % (2 ** (self.blocks.shape[0] - 1))):
            return f"BOFT's {self.blocks.shape[0]} butterfly stages do not fit {k} blocks of {bs} {side}"
        if self.rescale is not None and self.rescale.numel() != shape[0]:
            return f"OFT rescale has {self.rescale.numel()} values, layer has {shape[0]} outputs"
        return None


def _tensors(self) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


for _cls in (LoHaDelta, LoKrDelta, FullDelta, GLoRADelta, OFTDelta):
    _cls.tensors = _tensors

KINDS = ("lora", "loha", "lokr", "full", "dora", "ia3", "glora", "oft")

def has_factors(d) -> bool:
    """Whether a layer delta reads as ``scale * up @ down`` (LoRA, LoCon, LoHa, LoKr, full, DoRA's direction,
    GLoRA's fixed part). IA3 and OFT scale or rotate the base weight and have no factors to read; SHiRA is
    sparse. Code that reads factors (gates, activation statistics, the retriever's weight signal) skips them."""
    if d.is_sparse:
        return False
    try:
        return d.down is not None
    except AttributeError:
        return False


_LABELS = {"loha": "LoHa", "lokr": "LoKr", "full": "full", "dora": "DoRA", "ia3": "IA3", "glora": "GLoRA"}


def kind_label(adapter) -> str:
    """What a user calls the adapter's method, from its layers: ``LoRA``, ``LoCon`` (LoRA on convolutions too),
    ``LoHa``, ``LoKr``, ``DoRA``, ``IA3``, ``GLoRA``, ``OFT``, ``BOFT``, ``full``, ``SHiRA``; several joined by ``+``."""
    seen: list[str] = []
    plain_conv = False
    for d in adapter.deltas.values():
        if d.is_sparse:
            label = "SHiRA"
        elif isinstance(d, OFTDelta):
            label = "BOFT" if d.butterfly else "OFT"
        elif d.kind != "lora":
            label = _LABELS.get(d.kind, d.kind)
        else:
            label = "LoRA"
            plain_conv = plain_conv or d.is_conv
        if label not in seen:
            seen.append(label)
    if plain_conv:
        seen = ["LoCon" if s == "LoRA" else s for s in seen]
    return " + ".join(sorted(seen)) or "empty"
