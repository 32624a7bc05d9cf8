"""The stacked multi-adapter LoRA delta: one dispatching function (Triton on CUDA, torch elsewhere).

All adapters of one layer are stacked along the rank axis (FLoRA's exact stacking):
``sum_i w_i B_i A_i = [w_1 B_1 ... w_n B_n] [A_1; ...; A_n]``. A per-rank-column scale ``s`` carries
each adapter's mixing weight times ``alpha_i / r_i``, so one shrink and one expand serve any number
of adapters and any per-row routing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKEND_ENV = "LORA_COMPOSER_KERNELS"  # "auto" (default), "torch" or "triton"
BACKENDS = ("auto", "torch", "triton")


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


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_backend(x: torch.Tensor, conv: dict | None, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for this call: ``backend`` argument, else ``$LORA_COMPOSER_KERNELS``,
    else auto (Triton for CUDA tensors of Linear layers; Conv2d/LoCon deltas always run on torch)."""
    choice = backend or os.environ.get(BACKEND_ENV, "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; expected one of {', '.join(BACKENDS)}")
    if conv is not None or choice == "torch":
        return "torch"
    if choice == "triton":
        if x.device.type != "cuda" and not _triton_interpreting():
            raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return "triton"
    if x.device.type != "cuda" or (torch.is_grad_enabled() and (x.requires_grad or x.grad_fn is not None)):
        return "torch"  # the Triton kernels have no backward
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def stacked_delta(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    conv: dict | None = None,
    runs: list[tuple[int, int]] | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    row_runs: list[tuple[torch.Tensor, list[tuple[int, int]]]] | None = None,
) -> torch.Tensor:
    """``((x A^T) * s) B^T`` for stacked factors ``down`` (A) and ``up`` (B); with ``out``, ``out`` plus it.

    ``row_runs`` (torch path): ``[(row indices, column runs)]``, each group of rows computed on its own
    columns only (rows in no group get no delta); the result equals the dense product when the columns left
    out have a zero scale in those rows.

    The one entry point the runtime calls. ``backend`` (or ``$LORA_COMPOSER_KERNELS``): ``"auto"``
    (Triton shrink/expand kernels for CUDA tensors of Linear layers, torch otherwise), ``"torch"`` or
    ``"triton"`` (forced; on CPU tensors only under ``TRITON_INTERPRET=1``). With ``out`` (the base
    layer's output), the Triton path adds into it in place and returns it; the torch path returns
    ``out + delta``. See :func:`stacked_delta_torch` for the arguments.
    """
    if pick_backend(x, conv, backend) == "torch":
        if row_runs is not None:
            return _grouped_rows(x, down, up, scale, conv, row_runs, out)
        delta = stacked_delta_torch(x, down, up, scale, conv, runs)
        return delta if out is None else out + delta
    from lora_composer.kernels import triton_lora

    if runs is not None and runs:
        # one column range from the first live column to the last: columns of inactive adapters in
        # between have a zero scale, so no factor is copied
        a, b = runs[0][0], runs[-1][1]
        down, up, scale = down[a:b], up[:, a:b], scale.reshape(-1, scale.shape[-1])[:, a:b]
    if out is None:
        out = torch.zeros(*x.shape[:-1], up.shape[0], device=x.device, dtype=x.dtype)
    elif not out.is_contiguous() or (torch.is_grad_enabled() and out.requires_grad):
        out = out.contiguous().clone()
    return triton_lora.lora_delta_triton(x, down, up, scale, out)


def _grouped_rows(x, down, up, scale, conv, row_runs, out):
    """:func:`stacked_delta_torch` per group of rows, each on its own column runs, written into the rows."""
    scale2 = scale.reshape(-1, scale.shape[-1])
    result = None
    for rows, runs in row_runs:
        rows = rows.to(x.device)
        part = stacked_delta_torch(
            x.index_select(0, rows), down, up, scale2.index_select(0, rows.to(scale2.device)), conv, runs
        )
        if result is None:
            result = out.clone() if out is not None else part.new_zeros((x.shape[0], *part.shape[1:]))
        result.index_add_(0, rows, part.to(result.dtype))
    if result is None:  # no row has a live adapter
        delta = stacked_delta_torch(x, down, up, scale, conv)
        return delta if out is None else out + delta
    return result


def stacked_delta_torch(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    conv: dict | None = None,
    runs: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Torch reference: return ``((x A^T) * s) B^T`` for stacked factors ``down`` (A) and ``up`` (B).

    ``scale`` is ``[R]`` (same for every row) or ``[rows, R]`` (one row per batch element).
    ``conv`` holds Conv2d arguments (stride, padding, dilation) when the layer is a convolution
    (LoCon): ``down`` is then a ``[R, in, kh, kw]`` kernel and ``up`` a ``[out, R, 1, 1]`` one.
    ``runs`` restricts the sum to column ranges ``[start, end)`` (the live adapters), read as views.
    """
    if runs is not None and runs != [(0, down.shape[0])]:
        scale2 = scale.reshape(-1, scale.shape[-1])
        total = None
        for a, b in runs:
            part = stacked_delta_torch(x, down[a:b], up[:, a:b], scale2[:, a:b], conv)
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
