"""Rows that use different adapters compute only their own adapters' columns (a batch of requests with
different LoRA sets): the same output as every row computing every live column, and less work."""

from __future__ import annotations

import pytest
import torch

from lora_composer import tiny
from lora_composer.kernels import lora_ops
from lora_composer.runtime import LoraRuntime
from tests.test_runtime import adapter_from_layers, unet_call


def test_grouped_rows_equal_the_dense_product_linear_and_conv():
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(12, 16, generator=gen), torch.randn(20, 12, generator=gen)
    scale = torch.zeros(5, 12)
    scale[0, 0:4], scale[1, 4:8], scale[3, 0:4], scale[3, 8:12] = 0.5, 1.5, -1.0, 0.7  # row 2, 4: nothing
    x = torch.randn(5, 7, 16, generator=gen)
    out = torch.randn(5, 7, 20, generator=gen)
    groups = [(torch.tensor([0]), [(0, 4)]), (torch.tensor([1]), [(4, 8)]), (torch.tensor([3]), [(0, 4), (8, 12)])]
    want = out + ((x @ down.T) * scale[:, None, :]) @ up.T  # the formula, every row on every column
    got = lora_ops.stacked_delta(x, down, up, scale, runs=[(0, 12)], out=out, backend="torch", row_runs=groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], out[2]) and torch.equal(got[4], out[4])  # rows without a LoRA: the base output

    kdown, kup = torch.randn(12, 3, 3, 3, generator=gen), torch.randn(6, 12, 1, 1, generator=gen)
    xc = torch.randn(5, 3, 8, 8, generator=gen)
    conv = {"stride": 1, "padding": 1, "dilation": 1}
    dense = lora_ops.stacked_delta_torch(xc, kdown, kup, scale, conv)
    got = lora_ops.stacked_delta(xc, kdown, kup, scale, conv, runs=[(0, 12)], backend="torch", row_runs=groups)
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


@pytest.fixture
def four(sd15_pipe):
    return [
        adapter_from_layers(name, tiny.random_lora_layers(sd15_pipe, rank=4, seed=i, conv=True), alpha=4)
        for i, name in enumerate("abcd")
    ]


def test_requests_with_different_sets_compute_their_own_columns(sd15_pipe, four, monkeypatch):
    rt = LoraRuntime(sd15_pipe)
    for ad in four:
        rt.add(ad)
    slot = [rt.slots[n] for n in "abcd"]
    rows = torch.zeros(4, rt.denoiser_mix.slots)
    rows[0, slot[0]], rows[1, slot[1]], rows[2, slot[2]], rows[2, slot[3]] = 1.0, 0.8, 0.6, 1.2  # row 3: no LoRA
    rt.set_denoiser_rows(rows)
    calls = []
    real = lora_ops.stacked_delta_torch

    def counting(x, down, up, scale, conv=None, runs=None):
        calls.append(x.shape[0] * sum(b - a for a, b in (runs or [(0, down.shape[0])])))
        return real(x, down, up, scale, conv, runs)

    monkeypatch.setattr(lora_ops, "stacked_delta_torch", counting)
    monkeypatch.setattr(type(rt.layers[next(iter(rt.layers))]), "GROUP_MIN_MACS", {"linear": 0, "conv": 0})
    grouped = unet_call(sd15_pipe, batch=4)
    grouped_work = sum(calls)
    layers = [layer for layer in rt.layers.values() if layer.blocks]
    assert any(layer._row_runs for layer in layers)
    calls.clear()
    monkeypatch.setattr(type(layers[0]), "row_runs", lambda self, runs: None)  # every row on every live column
    rt.denoiser_mix.version += 1  # the layers recompute their cached scales and runs
    dense = unet_call(sd15_pipe, batch=4)
    torch.testing.assert_close(grouped, dense, atol=1e-5, rtol=1e-5)
    assert grouped_work <= 0.5 * sum(calls)  # rank-column x row products: at most half
    rt.set_weights({n: 0.0 for n in "abcd"})
    torch.testing.assert_close(grouped[3], unet_call(sd15_pipe, batch=4)[3], atol=1e-5, rtol=1e-5)
