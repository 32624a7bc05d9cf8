"""Triton shrink/expand kernels against the torch reference.

On the CPU they run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be set before
``lora_composer.kernels.triton_lora`` is imported (``triton.jit`` reads it when decorating), so it is set here, at
import time, and the module is reloaded if another test imported it first. With a GPU the same cases run
on CUDA with the compiled, autotuned kernels: ``TRITON_INTERPRET=0 pytest tests/test_kernels_triton.py -k cuda``.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # noqa: E402 - before the kernel module is imported

import pytest
import torch

pytest.importorskip("triton")

import lora_composer.kernels  # noqa: E402
from lora_composer.kernels import lora_ops  # noqa: E402

if "lora_composer.kernels.triton_lora" in sys.modules:
    importlib.reload(sys.modules["lora_composer.kernels.triton_lora"])
from lora_composer.kernels import triton_lora  # noqa: E402

CUDA = torch.cuda.is_available() and not triton_lora.INTERPRET
interpreter = pytest.mark.skipif(not triton_lora.INTERPRET, reason="TRITON_INTERPRET=0: CPU cases need the interpreter")
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def _case(seed, batch, tokens, k, n, ranks, rows, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = sum(ranks)
    x = torch.randn(batch, tokens, k, generator=g)
    down = torch.randn(r, k, generator=g) / k**0.5
    up = torch.randn(n, r, generator=g) / r**0.5
    # per-rank-column scale: adapter i's weight in each row times alpha_i / r_i
    w = torch.rand(rows, len(ranks), generator=g) * 2 - 0.5
    w[:, 0] = 0.0 if len(ranks) > 2 else w[:, 0]  # an inactive adapter in the middle of the stack
    cols = torch.cat([torch.full((ri,), i) for i, ri in enumerate(ranks)])
    alpha = torch.cat([torch.full((ri,), 4.0 / ri) for ri in ranks])
    scale = w[:, cols] * alpha
    base = torch.randn(batch, tokens, n, generator=g)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), down.to(**to), up.to(**to), scale.to(device), base.to(**to)


def _reference(x, down, up, scale, base):
    d = lora_ops.stacked_delta_torch(x.double(), down.double(), up.double(), scale.double())
    return base.double() + d


# tiny shapes: the interpreter runs one program at a time in numpy
SHAPES = [
    # seed, batch, tokens, K, N, ranks, rows
    (0, 1, 5, 40, 24, [4], 1),
    (1, 2, 7, 33, 50, [8, 4], 2),
    (2, 3, 3, 70, 17, [2, 16, 4, 8], 3),
    (3, 2, 9, 48, 40, [1, 3, 5, 7, 2, 4, 6, 8], 1),
    (4, 2, 4, 96, 36, [16, 16, 8], 2),
]


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[3]}N{s[4]}r{'-'.join(map(str, s[5]))}x{s[6]}")
def test_triton_matches_torch_interpreter(shape, dtype):
    seed, batch, tokens, k, n, ranks, rows = shape
    x, down, up, scale, base = _case(seed, batch, tokens, k, n, ranks, rows, dtype)
    out = triton_lora.lora_delta_triton(x, down, up, scale, base.clone())
    ref = _reference(x, down, up, scale, base)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@interpreter
@pytest.mark.parametrize("cfg", [{"SPLIT_K": 2}, {"SPLIT_K": 3, "BLOCK_K": 16, "BLOCK_M": 32, "BLOCK_N": 16}])
def test_split_k_and_block_sizes(cfg):
    x, down, up, scale, base = _case(7, 2, 6, 75, 29, [4, 12], 2, torch.float32)
    out = triton_lora.lora_delta_triton(x, down, up, scale, base.clone(), config=cfg)
    torch.testing.assert_close(out.double(), _reference(x, down, up, scale, base), atol=1e-4, rtol=1e-4)


@interpreter
def test_large_rank_spans_several_rank_blocks():
    x, down, up, scale, base = _case(8, 1, 3, 20, 18, [64, 80], 1, torch.float32)  # R = 144 > 128
    out = triton_lora.lora_delta_triton(x, down, up, scale, base.clone())
    torch.testing.assert_close(out.double(), _reference(x, down, up, scale, base), atol=1e-4, rtol=1e-4)


@interpreter
def test_dispatch_forced_triton_with_runs_and_2d_input():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 30, generator=g)
    down, up = torch.randn(12, 30, generator=g), torch.randn(22, 12, generator=g)
    scale = torch.rand(4, 12, generator=g)
    scale[:, 4:8] = 0  # the adapter between the two live runs is inactive
    runs = [(0, 4), (8, 12)]
    ref = lora_ops.stacked_delta_torch(x, down, up, scale, runs=runs)
    got = lora_composer.kernels.stacked_delta(x, down, up, scale, runs=runs, backend="triton")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    base = torch.randn(4, 22, generator=g)
    got = lora_composer.kernels.stacked_delta(x, down, up, scale, runs=runs, out=base.clone(), backend="triton")
    torch.testing.assert_close(got, base + ref, atol=1e-4, rtol=1e-4)


@interpreter
def test_dispatch_picks_torch_on_cpu_and_for_conv(monkeypatch):
    x = torch.randn(2, 8)
    assert lora_ops.pick_backend(x, None) == "torch"
    assert lora_ops.pick_backend(x, {"stride": 1}, "triton") == "torch"
    monkeypatch.setenv(lora_composer.kernels.BACKEND_ENV, "triton")
    assert lora_ops.pick_backend(x, None) == "triton"  # interpreter on: CPU tensors allowed
    monkeypatch.setenv(lora_composer.kernels.BACKEND_ENV, "torch")
    assert lora_ops.pick_backend(x, None) == "torch"
    monkeypatch.setenv(lora_composer.kernels.BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        lora_ops.pick_backend(x, None)


@interpreter
def test_runtime_forward_through_triton_backend(sd15_pipe, make_lora, monkeypatch):
    """The runtime's hook goes through the dispatcher: forcing Triton gives the torch output."""
    from lora_composer.adapters import load_adapter
    from lora_composer.runtime import LoraRuntime

    rt = LoraRuntime(sd15_pipe)
    for i, r in enumerate((4, 8)):
        rt.add(load_adapter(make_lora(sd15_pipe, f"a{i}", rank=r, seed=i, text_encoder=False)))
    rt.set_weights(unet={"a0": 0.8, "a1": 0.5})
    layer = next(lay for k, lay in rt.layers.items() if k.endswith("attn2.to_k"))
    x = torch.randn(2, 7, layer.module.in_features)
    monkeypatch.setenv(lora_composer.kernels.BACKEND_ENV, "torch")
    ref = layer.module(x)
    monkeypatch.setenv(lora_composer.kernels.BACKEND_ENV, "triton")
    got = layer.module(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="no GPU (or the interpreter is on)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", SHAPES + [(5, 2, 4096, 320, 320, [16] * 5, 2), (6, 1, 4096, 3072, 3072, [16, 64, 8], 1)]
)
def test_triton_matches_torch_cuda(shape, dtype):
    seed, batch, tokens, k, n, ranks, rows = shape
    x, down, up, scale, base = _case(seed, batch, tokens, k, n, ranks, rows, dtype, device="cuda")
    out = lora_composer.kernels.stacked_delta(x, down, up, scale, out=base.clone())
    ref = _reference(x, down, up, scale, base)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol * 4, rtol=rtol)
