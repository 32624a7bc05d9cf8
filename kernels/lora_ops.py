"""Torch reference for the stacked multi-adapter LoRA delta.

All adapters of one layer are stacked along the rank axis (FLoRA's exact stacking):
``sum_i w_i B_i A_i = [w_1 B_1 ... w_n B_n] [A_1; ...; A_n]``. A per-rank-column scale ``s`` carries
each adapter's mixing weight times ``alpha_i / r_i``, so one shrink and one expand serve any number
of adapters and any per-row routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_scale(scale: torch.Tensor, h: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Broadcast a ``[R]`` or ``[rows, R]`` scale against activations ``h`` (rank on ``channel_dim``)."""
    if scale.dim() == 1 or scale.shape[0] == 1:
        s = scale.reshape(-1)
        shape = [1] * h.dim()
        shape[channel_dim] = s.shape[0]
        return s.view(shape)
    rows = scale.shape[0]
    if h.shape[0] != rows:
        raise ValueError(f"mixing tensor has {rows} rows but the batch has {h.shape[0]}")
    shape = [1] * h.dim()
    shape[0] = rows
    shape[channel_dim] = scale.shape[1]
    return scale.view(shape)


def stacked_delta(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    conv: dict | None = None,
    runs: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Return ``((x A^T) * s) B^T`` for stacked factors ``down`` (A) and ``up`` (B).

    ``scale`` is ``[R]`` (same for every row) or ``[rows, R]`` (one row per batch element).
    ``conv`` holds Conv2d arguments (stride, padding, dilation) when the layer is a convolution
    (LoCon): ``down`` is then a ``[R, in, kh, kw]`` kernel and ``up`` a ``[out, R, 1, 1]`` one.
    ``runs`` restricts the sum to column ranges ``[start, end)`` (the live adapters), read as views.
    """
    if runs is not None and runs != [(0, down.shape[0])]:
        scale2 = scale.reshape(-1, scale.shape[-1])
        total = None
        for a, b in runs:
            part = stacked_delta(x, down[a:b], up[:, a:b], scale2[:, a:b], conv)
            total = part if total is None else total + part
        return total
    scale = scale.to(x.dtype)
    if conv is None:
        h = F.linear(x, down)
        h = h * _row_scale(scale, h, h.dim() - 1)
        return F.linear(h, up)
    h = F.conv2d(x, down, **conv)
    h = h * _row_scale(scale, h, 1)
    return F.conv2d(h, up)


def fold_delta(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dense ``B diag(s) A`` shaped like ``weight`` and in its dtype (computed in fp32, one GEMM)."""
    up32 = up.reshape(up.shape[0], -1).float() * scale.reshape(1, -1).float()
    delta = up32 @ down.reshape(down.shape[0], -1).float()
    return delta.reshape(weight.shape).to(weight.dtype)
