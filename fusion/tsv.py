"""tsv: Task Singular Vectors merge (TSV-M, Gargiulo et al., CVPR 2025) of the LoRAs, then merge's single pass.

Per layer, each LoRA's delta is split into its singular vectors, ``dW_i = U_i S_i V_i^T``. Merge sums them;
where two LoRAs' singular vectors overlap, their effects add on the same directions and each disturbs what
the other reads and writes. TSV-M concatenates every LoRA's vectors, ``U = [U_1 ... U_N]`` (and ``V``),
replaces them by the nearest matrix with orthonormal columns (the polar factor ``P Q^T`` of ``U = P S Q^T``,
Procrustes), and keeps each LoRA's singular values: ``dW_i' = U'_i S_i V'_i^T``. LoRAs whose subspaces are
already orthogonal are left exactly as they are, so the result reduces to merge; one LoRA alone is unchanged.

``side``: which vectors are decorrelated, ``both`` (the paper), ``out`` (only what the LoRAs write) or
``in`` (only what they read). The result is low-rank (each LoRA keeps its rank), so the derived adapters
cost what the originals cost. Layers a rule cannot read (SHiRA, DoRA, IA3, OFT) keep their delta.
"""

from __future__ import annotations

import torch

from lora_composer.fusion.task_arithmetic import RuleMerge

SIDES = ("both", "out", "in")


def polar(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of ``m`` (``[d, k]``): the nearest matrix with orthonormal columns
    (orthonormal rows when ``k > d``)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def singular_parts(delta: torch.Tensor, tol: float = 1e-6):
    """``(U, S, V)`` of a 2-D delta without its (numerically) zero singular values."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = s > tol * s.max()  # an all-zero delta keeps nothing
    return u[:, keep], s[keep], vh[keep].T


def tsv_layer(stack: torch.Tensor, side: str = "both") -> list:
    """One layer's deltas ``[N, out, in]`` -> per LoRA ``(up, down)`` factors (``None`` where it had none)."""
    parts = [singular_parts(d) for d in stack]
    ranks = [int(s.numel()) for _, s, _ in parts]
    if sum(ranks) == 0:
        return [None] * len(parts)
    u = torch.cat([p[0] for p in parts], dim=1)
    v = torch.cat([p[2] for p in parts], dim=1)
    if side in ("both", "out"):
        u = polar(u)
    if side in ("both", "in"):
        v = polar(v)
    out, start = [], 0
    for (_, s, _), r in zip(parts, ranks):
        if r == 0:
            out.append(None)
            continue
        cols = slice(start, start + r)
        out.append(((u[:, cols] * s).float(), v[:, cols].T.float()))
        start += r
    return out


class TsvStrategy(RuleMerge):
    name = "tsv"
    suffix = "~tsv"

    def __init__(self, side: str = "both"):
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        self.side = side

    def rule(self, stack: torch.Tensor, names: list) -> list:
        return tsv_layer(stack, self.side)
