"""Sparse (SHiRA) deltas: a scatter into the weight whose backup is only the overwritten values.

A sparse delta is a set of flat positions ``idx`` (``row * in_features + col``, unique, sorted; for a Conv2d
``row * in * kh * kw + col``, the kernel flattened: the position in its contiguous ``[out, in, kh, kw]`` weight)
and fp32 values. Fusing reads the current values at ``idx`` (the backup), adds the delta in fp32 and writes the
result back rounded once to the weight's dtype; restoring writes the backup back. Both are
O(nonzeros) gathers/scatters (one ``index_select`` and one ``scatter_``/``scatter_add_``, a single kernel
each on CUDA; ``scatter_`` is about twice as fast as ``index_copy_`` on the CPU), and restoring is
bit-exact in any dtype.

On the CPU a switch is bound by memory traffic, not by these calls: each pass over a set of positions
(restore, gather, scatter) touches about a quarter of the weight's cache lines at 2% density and costs
about as much as reading the whole weight once; a caller that already knows the values at ``idx`` passes
them as ``backup`` and saves the gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _flat(weight: torch.Tensor) -> torch.Tensor:
    if not weight.is_contiguous():
        raise ValueError("sparse fusing needs a contiguous weight")
    return weight.detach().view(-1)


def sparse_fold(
    weight: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, backup: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight.flat[idx] += values`` (fp32 sum, one rounding); returns the overwritten values (the backup).

    ``idx`` must not repeat a position (merge several adapters with :func:`merge_sparse` first).
    ``backup``: the values the weight is known to hold at ``idx`` (kept from an earlier fold of the same
    positions); the gather is skipped and the fold is a single scatter, with the same result.
    """
    flat = _flat(weight)
    if backup is None:
        backup = flat.index_select(0, idx)
        if weight.dtype is torch.float32 and values.dtype is torch.float32:
            flat.scatter_add_(0, idx, values)  # the same single fp32 rounding, without a temporary
            return backup
    flat.scatter_(0, idx, (backup.float() + values.float()).to(weight.dtype))
    return backup


def sparse_restore(weight: torch.Tensor, idx: torch.Tensor, backup: torch.Tensor) -> None:
    """Write the values :func:`sparse_fold` returned back: the weight is bit-identical to before."""
    _flat(weight).scatter_(0, idx, backup)


def merge_sparse(indices: list[torch.Tensor]):
    """Union of several adapters' flat positions: ``(union, inverse)`` such that
    ``zeros(len(union)).index_add_(0, inverse, cat(values))`` sums them (overlaps added)."""
    if len(indices) == 1:
        return indices[0], None
    union, inverse = torch.unique(torch.cat(indices), sorted=True, return_inverse=True)
    return union, inverse


def merged_values(union: torch.Tensor, inverse: torch.Tensor | None, values: list[torch.Tensor]) -> torch.Tensor:
    """fp32 summed values at ``union`` for the (already weighted) per-adapter ``values``."""
    if inverse is None:
        return values[0].float()
    out = torch.zeros(union.numel(), device=union.device, dtype=torch.float32)
    return out.index_add_(0, inverse, torch.cat([v.float() for v in values]))


def sparse_delta(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, out_features: int) -> torch.Tensor:
    """Unfused forward of a sparse delta: ``x @ D^T`` with ``D.flat[idx] = values``.

    ``values`` is ``[N]`` (every batch row) or ``[rows, N]`` (one row of values per batch row, for
    per-row mixing weights; rows with equal values share one product). Computed as a sparse-dense product
    (O(nonzeros * tokens)); the base weight is never cloned (PEFT's unmerged SHiRA forward clones it on every
    call).
    """
    in_features = x.shape[-1]
    rows_i = torch.div(idx, in_features, rounding_mode="floor")
    cols_i = idx - rows_i * in_features
    ij = torch.stack([rows_i, cols_i])

    def one(xb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x2 = xb.reshape(-1, in_features)
        d = torch.sparse_coo_tensor(
            ij, v.to(x2.dtype), (out_features, in_features), is_coalesced=True, check_invariants=False
        )
        return torch.sparse.mm(d, x2.t()).t().reshape(*xb.shape[:-1], out_features)

    return _per_row(x, values, one)


def _per_row(x: torch.Tensor, values: torch.Tensor, apply) -> torch.Tensor:
    """``apply(x, v)`` for ``values`` ``[N]``, or per batch row for ``[rows, N]``: rows with the same values
    share one call, and rows whose values are all zero (a guidance half without the adapter) cost nothing."""
    if values.dim() == 1 or values.shape[0] == 1:
        return apply(x, values.reshape(-1))
    if values.shape[0] != x.shape[0]:
        raise ValueError(f"mixing tensor has {values.shape[0]} rows but the batch has {x.shape[0]}")
    distinct, which = torch.unique(values, dim=0, return_inverse=True)
    out = None
    for u in range(distinct.shape[0]):
        if distinct.shape[0] > 1 and not bool(distinct[u].any()):
            continue
        rows = (which == u).nonzero().squeeze(1)
        if rows.numel() == x.shape[0]:
            return apply(x, distinct[u])
        part = apply(x.index_select(0, rows), distinct[u])
        out = part.new_zeros(x.shape[0], *part.shape[1:]) if out is None else out
        out.index_copy_(0, rows, part)
    return out


def sparse_conv_delta(
    x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, weight_shape, conv: dict
) -> torch.Tensor:
    """Unfused forward of a sparse Conv2d delta: ``conv2d(x, D)`` with ``D.flat[idx] = values``, ``D`` shaped
    ``weight_shape`` (``[out, in, kh, kw]``) and ``conv`` the layer's stride, padding and dilation.

    ``D`` is materialised (one zeroed weight-sized buffer and a scatter, O(weight) per call) and applied by
    one dense convolution: on the CPU that is 2-5x faster at 2-10% density than ``unfold`` (im2col, kh*kw
    copies of the input) followed by a sparse-dense product, and the scatter is small next to the
    convolution itself. ``values`` is ``[N]`` or ``[rows, N]`` (per-row mixing, as :func:`sparse_delta`).
    """
    numel = math.prod(weight_shape)

    def kernel(v: torch.Tensor) -> torch.Tensor:
        d = torch.zeros(numel, device=x.device, dtype=torch.float32).index_add_(0, idx, v.float())
        return d.view(*weight_shape).to(x.dtype)

    return _per_row(x, values, lambda xs, v: F.conv2d(xs, kernel(v), **conv))
