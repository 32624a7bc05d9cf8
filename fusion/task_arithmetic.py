"""What TIES and DARE share: each LoRA's dense per-layer delta, rewritten, run as merge.

Model-merging methods (task arithmetic, TIES, DARE) combine *task vectors*, here the dense delta
``dW_i = s_i B_i A_i`` each LoRA adds to a layer. A rule maps the deltas of one layer to new ones; the
result is merge of the rewritten deltas: ``W = W0 + sum_i w_i dW_i'`` with the user weights ``w_i``. Each
``dW_i'`` becomes a derived adapter (a dense ``full`` delta per layer) that the pipeline attaches for the
call and drives in the original's place, so inference costs merge's one pass per step (fusable).

The derived deltas are dense (a full UNet's worth of fp32 per LoRA on a real model: 3.4 GB for SD1.5);
``rank=R`` stores each as its best rank-``R`` approximation instead (PEFT's ``*_svd`` variants), exact only
when ``R`` reaches the delta's rank.

Layers a rule cannot read keep their delta: SHiRA's sparse deltas and the multiplicative kinds (DoRA, IA3,
OFT, GLoRA's ``W0 A`` term), whose change depends on the base weight.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import Callable

import torch

from lora_composer.adapters.kinds import FullDelta
from lora_composer.adapters.shira import dense_delta
from lora_composer.adapters.types import LayerDelta
from lora_composer.fusion.base import DerivedMerge

# ``rule(deltas [N, out, in], names) -> [N, out, in]``: one layer's rewritten deltas, in the names' order;
# or a list of ``(up [out, r], down [r, in])`` factor pairs (``None``: no delta) for rules whose result is low-rank.
Rule = Callable[[torch.Tensor, list], "torch.Tensor | list"]


def readable(d) -> bool:
    """Whether a layer delta is a fixed additive matrix (LoRA, LoCon, LoHa, LoKr, full)."""
    return not d.is_sparse and d.additive


def factored(up: torch.Tensor, down: torch.Tensor, like) -> LayerDelta:
    """``up @ down`` (``[out, r]``, ``[r, in * kh * kw]``) as a ``LayerDelta`` shaped like the layer delta ``like``."""
    r = int(down.shape[0])
    if like.down.dim() == 4:  # a conv layer: factors shaped as LoCon's
        down, up = down.reshape(r, *like.down.shape[1:]), up.reshape(up.shape[0], r, 1, 1)
    return LayerDelta(down=down.contiguous(), up=up.contiguous(), alpha=float(r))


def compressed(delta: torch.Tensor, rank: int, like):
    """``delta`` (2-D) as a rank-``rank`` ``LayerDelta`` (truncated SVD), shaped like the layer delta ``like``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(int(rank), int(s.numel()))
    return factored(u[:, :r] * s[:r], vh[:r], like)


def derive(adapters: list, rule: Rule, suffix: str, rank: int = 0) -> dict:
    """``{original name: derived Adapter}``: every layer some adapter touches, rewritten by ``rule``.

    The rule sees every listed adapter's delta of the layer (zeros for adapters without a readable one, so
    that, e.g., a sign election counts them as abstaining); an adapter's layer is replaced only where it had a
    readable delta, and dropped where the rewritten delta is all zero. ``rank > 0``: stored as rank-``rank`` factors (:func:`compressed`).
    """
    keys: list[str] = []
    for ad in adapters:
        keys += [k for k, d in ad.deltas.items() if readable(d) and k not in keys]
    new: dict[str, dict] = {ad.name: dict(ad.deltas) for ad in adapters}
    for key in keys:
        present = [i for i, ad in enumerate(adapters) if key in ad.deltas and readable(ad.deltas[key])]
        like = adapters[present[0]].deltas[key]
        shape = tuple(dense_delta(like).shape)
        stack = torch.stack(
            [dense_delta(ad.deltas[key]) if i in present else torch.zeros(shape) for i, ad in enumerate(adapters)]
        )
        out = rule(stack, [ad.name for ad in adapters])
        for i in present:
            ad, delta = adapters[i], out[i]
            if delta is None or (torch.is_tensor(delta) and not bool(delta.any())):
                new[ad.name].pop(key, None)
            elif isinstance(delta, tuple):  # low-rank factors, kept as they are
                new[ad.name][key] = factored(*delta, like)
            elif rank > 0:
                new[ad.name][key] = compressed(delta, rank, like)
            else:
                new[ad.name][key] = FullDelta(diff=delta.contiguous())
    return {ad.name: dataclasses.replace(ad, name=ad.name + suffix, deltas=new[ad.name]) for ad in adapters}


def top_magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """``1`` on the ``int(density * numel)`` largest ``|t|`` entries, else ``0`` (TIES' trim step)."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    if k > 0:
        mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return mask.reshape(t.shape)


def elect_and_share(stack: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election and disjoint mean on ``[N, ...]`` trimmed deltas: each entry keeps the deltas whose
    sign agrees with the elected one (``total``: the sign of the sum; ``frequency``: the more frequent sign),
    each divided by how many agree there, so the weighted sum of the result is the disjoint mean."""
    sign = stack.sign()
    elected = stack.sum(0) if method == "total" else sign.sum(0)
    agree = sign == torch.where(elected >= 0, 1.0, -1.0)
    count = agree.sum(0).clamp(min=1)
    return stack * agree / count


def check_density(density: float) -> float:
    density = float(density)
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


class RuleMerge(DerivedMerge):
    """A derived merge whose adapters are rewritten layer by layer by :meth:`rule` (:func:`derive`)."""

    rank = 0  # > 0: derived deltas stored as rank-``rank`` factors

    @abstractmethod
    def rule(self, stack: torch.Tensor, names: list) -> "torch.Tensor | list":
        """One layer's rewritten deltas (see :data:`Rule`)."""

    def build_derived(self) -> dict | None:
        adapters = self.source_adapters()
        return derive(adapters, self.rule, self.suffix, self.rank) if adapters else None
