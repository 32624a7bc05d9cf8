"""OFT and BOFT: the weight rotated by block-diagonal orthogonal matrices.

kohya spelling (LyCORIS): ``oft_blocks`` ``[k, b, b]`` (diagonal OFT) or ``[m, k, b, b]`` (BOFT, ``m`` butterfly
stages), ``alpha`` (the constraint), optional ``rescale``; the output rows are rotated. PEFT spelling:
``oft_R.weight`` (OFT, from PEFT 0.14; settings from the config) and ``boft_R`` / ``boft_s`` (BOFT); PEFT
rotates the layer's input. Multiplicative: ``dense`` is ``f(W0) - W0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import KindError, NoFactors, PeftLayer, dims, finite, need


@dataclass(eq=False)
class OFTDelta(NoFactors):
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
    kohya_suffixes = ("oft_blocks", "rescale")
    peft_suffixes = ("oft_R.weight", "boft_R", "boft_s")

    @property
    def label(self) -> str:
        return "BOFT" if self.butterfly else "OFT"

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
                k = 2**i * (bs // 2)
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

    @classmethod
    def claims(cls, suffixes, spelling):
        return "oft_blocks" in suffixes if spelling == "kohya" else bool(set(suffixes) & set(cls.peft_suffixes))

    @classmethod
    def from_kohya(cls, name: str, parts: dict, alpha: float | None, inner=None) -> OFTDelta:
        blocks = parts["oft_blocks"]
        if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
            raise KindError(
                f"key {name}.oft_blocks: expected [blocks, b, b] (OFT) or [stages, blocks, b, b] (BOFT), "
                f"got shape {tuple(blocks.shape)}"
            )
        return cls(blocks, parts.get("rescale"), 0.0 if alpha is None else float(alpha))

    @classmethod
    def from_peft(cls, name: str, parts: dict, layer: PeftLayer, inner=None) -> OFTDelta:
        if "oft_R.weight" in parts:
            return peft_oft(name, parts, layer.config or {})
        return peft_boft(name, parts)


def peft_oft(name: str, parts: dict, config: dict) -> OFTDelta:
    """PEFT's OFT (0.14 on): ``oft_R.weight`` ``[k, b(b-1)/2]`` holds each block's upper triangle ``M``; PEFT
    turns it into ``Q = M - M^T``, rotates the layer's input by ``R`` and merges ``W' = W R^T``.

    Its settings come from the config: ``coft``/``eps`` project each block's ``Q`` to norm at most
    ``eps / sqrt(k)`` (done here once, as PEFT does to the weight itself), ``block_share`` (one block for
    the whole axis), ``use_cayley_neumann``/``num_cayley_neumann_terms`` (its series ``N(Q)``, else the exact
    ``(I - Q)(I + Q)^-1``). Missing settings take PEFT's defaults."""
    key = "oft_R.weight"
    vec = dims(name, parts, key, (2,))
    finite(name, key, vec)
    n = int(vec.shape[1])
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if b * (b - 1) // 2 != n:  # 0 values: blocks of 1, which PEFT writes for a prime input size
        raise KindError(f"key {name}.{key}: {n} values per block is not b(b-1)/2 for any block size b")
    rows, cols = torch.triu_indices(b, b, 1)
    v = vec.float()
    if config.get("coft", False):  # PEFT's _project_batch, in its order of operations
        m = torch.zeros(v.shape[0], b, b)
        m[:, rows, cols] = v
        q = m - m.transpose(-2, -1)
        eps = float(config.get("eps", 6e-5)) * 1 / torch.sqrt(torch.tensor(q.shape[0]))
        norm = torch.norm(q, dim=(1, 2), keepdim=True)
        v = torch.where(norm <= eps, q, eps * (q / norm))[:, rows, cols]
    m = torch.zeros(v.shape[0], b, b)
    m[:, rows, cols] = v
    # OFTDelta merges W' = W R with R = (I + Q)(I - Q)^-1 or N(Q), Q = B - B^T. PEFT's W R_peft^T is that with
    # B = M for its exact branch ((I - Q)(I + Q)^-1 transposed) and B = -M for its series (N(Q)^T = N(-Q)).
    series = _neumann_series(config) if config.get("use_cayley_neumann", True) else ()
    shared = config.get("block_share")
    shared = bool(shared) if shared is not None else v.shape[0] == 1
    return OFTDelta(-m if series else m, on_input=True, shared=shared, series=series)


def _neumann_series(config: dict) -> tuple[float, ...]:
    """Coefficients of ``Q^0, Q^1, ...`` in PEFT's Cayley-Neumann series of ``num_cayley_neumann_terms`` n terms:
    from PEFT 0.18 ``I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)`` (at least up to ``Q^3``), before it every power
    up to ``Q^(n-1)`` times 2. A config without ``peft_version`` gets the current series, as PEFT computes it."""
    n = int(config.get("num_cayley_neumann_terms", 5))
    version = str(config.get("peft_version") or "").partition("@")[0]
    if n <= 2:
        return (1.0, 2.0)[: max(n, 1)]
    if version and _older(version, (0, 18)):
        return (1.0,) + (2.0,) * (n - 1)
    return (1.0, 2.0, 2.0) + (2.0,) * max(0, n - 4) + (1.0,)


def peft_boft(name: str, parts: dict) -> OFTDelta:
    """PEFT's BOFT: ``boft_R`` ``[m, k, b, b]`` (``m`` butterfly factors) and ``boft_s`` (one scale per output).

    PEFT rotates each block by ``(I - S)(I + S)^-1``, ``S = (B - B^T) / 2``, merges ``W' = s * (W M^T)`` with
    ``M = P_{m-1} D_{m-1} P_{m-1}^T ... P_0 D_0 P_0^T``; its permutations pair inputs ``2^i b / 2`` apart as
    LyCORIS's butterfly does, with each block's two halves one after the other where LyCORIS interleaves them."""
    r = dims(name, parts, "boft_R", (4,))
    s = need(name, parts, "boft_s")
    if r.shape[-1] != r.shape[-2] or r.shape[-1] < 1:
        raise KindError(f"key {name}.boft_R: expected [factors, blocks, b, b], got shape {tuple(r.shape)}")
    if s.dim() != 2 or 1 not in s.shape:
        raise KindError(f"key {name}.boft_s: expected [out, 1] or [1, out], got shape {tuple(s.shape)}")
    finite(name, "boft_R", r)
    finite(name, "boft_s", s)
    m, b = int(r.shape[0]), int(r.shape[-1])
    half = r.float() / 2
    if m == 1:  # one factor is a diagonal OFT: W' = W R_peft^T, R_peft^T = Cayley(S), so B = (B_peft) / 2
        return OFTDelta(half[0], rescale=s.reshape(-1, 1), on_input=True)
    if b % 2:
        raise KindError(f"key {name}.boft_R: {m} butterfly factors need an even block size, got {b}")
    # LyCORIS's block position 2j + h holds PEFT's h * b/2 + j; R_peft = Cayley(-S), so B = -B_peft / 2
    order = torch.tensor([h * (b // 2) + j for j in range(b // 2) for h in (0, 1)])
    return OFTDelta(-half[..., order, :][..., :, order], rescale=s.reshape(-1, 1), on_input=True)


def _older(version: str, than: tuple[int, ...]) -> bool:
    parts = []
    for piece in version.split(".")[: len(than)]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits[:6]))
    return tuple(parts) < than
