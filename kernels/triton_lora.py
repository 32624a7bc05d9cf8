"""Triton path of the stacked multi-adapter delta: shrink then expand (Punica SGMV / vLLM lora_shrink/expand).

``y += ((x A^T) * s[row]) B^T`` for a Linear layer, all adapters stacked along the rank axis (mixed ranks
are just more columns; a column block past ``R`` is masked), ``s`` a per-batch-row, per-rank-column scale
(one row broadcasts to every token; ``rows == batch`` routes adapters per row, Composite-style).

- shrink: ``H[M, R] = (X[M, K] @ A[R, K]^T) * s[m // T, R]`` with fp32 accumulators, split along K when
  few (M, R) tiles would leave the GPU idle (each split adds its partial sum into a zeroed fp32 buffer
  with ``atomic_add``);
- expand: ``Y[M, N] += H[M, R] @ B[N, R]^T``, reading the fp32 ``H`` and adding into the base output in
  place (one read and one write of ``Y``), in ``Y``'s dtype.

Block sizes are autotuned per shape on CUDA (``triton.autotune``, cached per key). Under Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors, used by the test suite) a fixed small configuration is
used and every load is cast to fp32 inside the kernel: the interpreter has no bf16 arithmetic.

Import this module only after ``TRITON_INTERPRET`` has its final value: ``triton.jit`` reads it when the
kernels are decorated.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    s_ptr,
    h_ptr,
    M,
    K,
    R,
    T,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_sb,
    stride_sr,
    stride_hm,
    stride_hr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K  # K range of this split, a multiple of BLOCK_K
    k_start = pid_k * k_chunk
    for k0 in range(0, k_chunk, BLOCK_K):
        kk = k_start + k0 + offs_k
        mask_k = (kk < K) & (k0 + offs_k < k_chunk)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + kk[:, None] * stride_ak,
            mask=mask_r[None, :] & mask_k[:, None],
            other=0.0,
        )
        if CAST_FP32:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, a, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a, acc)
    # per-row, per-rank-column scale: token m belongs to batch row m // T (stride_sb = 0 broadcasts one row)
    srow = offs_m // T
    s = tl.load(
        s_ptr + srow[:, None] * stride_sb + offs_r[None, :] * stride_sr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    ).to(tl.float32)
    acc = acc * s
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
    h_mask = mask_m[:, None] & mask_r[None, :]
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=h_mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=h_mask)


@triton.jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    R,
    stride_hm,
    stride_hr,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CAST_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        h = tl.load(
            h_ptr + offs_m[:, None] * stride_hm + rr[None, :] * stride_hr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + rr[:, None] * stride_br,
            mask=mask_n[None, :] & mask_r[:, None],
            other=0.0,
        )
        if CAST_FP32:
            b = b.to(tl.float32)
        else:
            h = h.to(b.dtype)  # half-precision tensor-core dot, fp32 accumulator
        if IEEE:
            acc = tl.dot(h, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, b, acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


# -- launch configurations ---------------------------------------------------------------------------
def _shrink_configs():
    out = []
    for bm in (16, 32, 64, 128):
        for bk in (32, 64, 128):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4, num_stages=3))
    return out


def _expand_configs():
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (32, 64, 128):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=3))
    return out


def _m_bucket(m: int) -> int:
    """Autotune key for M: its power-of-two bucket, so every token count does not retune."""
    return 1 << max(0, (m - 1).bit_length())


_shrink_tuned = None
_expand_tuned = None


def _tuned():
    """Autotuned launchers, built on first CUDA use (cached per shape key by triton.autotune)."""
    global _shrink_tuned, _expand_tuned
    if _shrink_tuned is None:
        _shrink_tuned = triton.autotune(_shrink_configs(), key=["M_BUCKET", "K", "R_PAD", "SPLIT_K"])(_shrink_entry)
        _expand_tuned = triton.autotune(_expand_configs(), key=["M_BUCKET", "N", "R_PAD"], restore_value=["y_ptr"])(
            _expand_entry
        )
    return _shrink_tuned, _expand_tuned


# autotune needs the key arguments in the kernel signature: thin jit wrappers that take them
@triton.jit
def _shrink_entry(
    x_ptr,
    a_ptr,
    s_ptr,
    h_ptr,
    M,
    K,
    R,
    T,
    M_BUCKET,
    R_PAD,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_sb,
    stride_sr,
    stride_hm,
    stride_hr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    _shrink_kernel(
        x_ptr,
        a_ptr,
        s_ptr,
        h_ptr,
        M,
        K,
        R,
        T,
        stride_xm,
        stride_xk,
        stride_ar,
        stride_ak,
        stride_sb,
        stride_sr,
        stride_hm,
        stride_hr,
        BLOCK_M,
        BLOCK_R,
        BLOCK_K,
        SPLIT_K,
        CAST_FP32,
        IEEE,
    )


@triton.jit
def _expand_entry(
    h_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    R,
    M_BUCKET,
    R_PAD,
    stride_hm,
    stride_hr,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CAST_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    _expand_kernel(
        h_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        R,
        stride_hm,
        stride_hr,
        stride_bn,
        stride_br,
        stride_ym,
        stride_yn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_R,
        CAST_FP32,
        IEEE,
    )


def split_k(m: int, r: int, k: int, block_r: int) -> int:
    """Split K when too few (M, R) tiles would fill the GPU (small batches of tokens, wide layers).

    Chosen by shape, not autotuned: split partial sums are added with ``atomic_add`` into a zeroed buffer,
    which an autotuner's repeated benchmark runs would accumulate into.
    """
    tiles = triton.cdiv(m, 64) * triton.cdiv(r, block_r)
    if k < 1024 or tiles >= 64:
        return 1
    return 8 if tiles < 16 and k >= 2048 else 4


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r)) if r <= 128 else 64


def lora_delta_triton(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """Add ``((x down^T) * scale) up^T`` into ``out`` (shaped like ``x`` with ``up.shape[0]`` features).

    ``x`` is ``[..., K]`` with a leading batch axis when ``scale`` has more than one row; ``down`` is
    ``[R, K]`` and ``up`` ``[N, R]`` (strided views are fine); ``scale`` is ``[R]`` or ``[rows, R]``.
    ``config`` fixes the block sizes (``BLOCK_M``, ``BLOCK_K``, ``SPLIT_K``, ``BLOCK_N``) instead of
    autotuning; the interpreter always uses a fixed one. Returns ``out``.
    """
    K = x.shape[-1]
    R = down.shape[0]
    N = up.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y2 = out.view(-1, N) if out.is_contiguous() else None
    if y2 is None:
        raise ValueError("out must be contiguous")
    scale = scale.reshape(-1, R).float()
    rows = scale.shape[0]
    if rows == 1:
        T, stride_sb = max(M, 1), 0
    else:
        if M % rows:
            raise ValueError(f"{rows} scale rows do not divide {M} tokens")
        T, stride_sb = M // rows, scale.stride(0)
    if M == 0 or R == 0 or N == 0:
        return out
    cast = INTERPRET or x.dtype == torch.float32 or down.dtype == torch.float32
    ieee = (not INTERPRET) and x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    block_r = _block_r(R)
    use_fixed = INTERPRET or config is not None or x.device.type != "cuda"
    cfg = {"BLOCK_M": 16, "BLOCK_K": 32, "SPLIT_K": 1, "BLOCK_N": 32, **(config or {})}
    split = cfg["SPLIT_K"] if use_fixed else split_k(M, R, K, block_r)
    alloc = torch.zeros if split > 1 else torch.empty
    h = alloc((M, R), device=x.device, dtype=torch.float32)
    xs = (x2.stride(0), x2.stride(1))
    shrink_args = (x2, down, scale, h, M, K, R, T)
    shrink_strides = (*xs, down.stride(0), down.stride(1), stride_sb, scale.stride(1), h.stride(0), h.stride(1))
    expand_strides = (h.stride(0), h.stride(1), up.stride(0), up.stride(1), y2.stride(0), y2.stride(1))
    if use_fixed:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(R, block_r), cfg["SPLIT_K"])
        _shrink_kernel[grid](
            *shrink_args,
            *shrink_strides,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_R=block_r,
            BLOCK_K=cfg["BLOCK_K"],
            SPLIT_K=cfg["SPLIT_K"],
            CAST_FP32=cast,
            IEEE=ieee,
        )
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
        _expand_kernel[grid](
            h,
            up,
            y2,
            M,
            N,
            R,
            *expand_strides,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_R=min(block_r, 64),
            CAST_FP32=cast,
            IEEE=ieee,
        )
        return out
    shrink, expand = _tuned()
    mb = _m_bucket(M)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r), split)  # noqa: E731
    shrink[grid](*shrink_args, mb, block_r, *shrink_strides, BLOCK_R=block_r, SPLIT_K=split, CAST_FP32=cast, IEEE=ieee)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    expand[grid](h, up, y2, M, N, R, mb, block_r, *expand_strides, BLOCK_R=min(block_r, 64), CAST_FP32=cast, IEEE=ieee)
    return out
