"""The torch stacked-delta op against a plain per-adapter loop (the formula PEFT applies)."""

import torch

from lora_composer.kernels import fold_delta, stacked_delta


def _factors(ranks, d_in, d_out, gen):
    downs = [torch.randn(r, d_in, generator=gen) for r in ranks]
    ups = [torch.randn(d_out, r, generator=gen) for r in ranks]
    return downs, ups


def test_linear_per_row_scales_match_loop():
    gen = torch.Generator().manual_seed(0)
    ranks, alphas = [2, 5, 3], [4.0, 5.0, 1.0]
    downs, ups = _factors(ranks, 7, 11, gen)
    x = torch.randn(4, 6, 7, generator=gen)
    w = torch.tensor([[0.5, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [-0.3, 2.0, 0.1]])
    s = torch.cat([w[:, i : i + 1] * (alphas[i] / r) * torch.ones(1, r) for i, r in enumerate(ranks)], dim=1)
    got = stacked_delta(x, torch.cat(downs), torch.cat(ups, dim=1), s)
    ref = torch.zeros(4, 6, 11)
    for i, r in enumerate(ranks):
        ref += w[:, i, None, None] * (alphas[i] / r) * (x @ downs[i].T @ ups[i].T)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_conv_matches_loop():
    gen = torch.Generator().manual_seed(1)
    ranks = [2, 3]
    downs = [torch.randn(r, 4, 3, 3, generator=gen) for r in ranks]
    ups = [torch.randn(5, r, 1, 1, generator=gen) for r in ranks]
    x = torch.randn(2, 4, 8, 8, generator=gen)
    w = [0.7, 0.3]
    s = torch.cat([torch.full((r,), w[i] / r) for i, r in enumerate(ranks)])
    got = stacked_delta(x, torch.cat(downs), torch.cat(ups, dim=1), s, conv=dict(stride=1, padding=1, dilation=1))
    ref = sum(
        w[i] / r * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, downs[i], padding=1), ups[i])
        for i, r in enumerate(ranks)
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fold_is_sum_of_weighted_products():
    gen = torch.Generator().manual_seed(2)
    ranks = [4, 1]
    downs, ups = _factors(ranks, 9, 6, gen)
    s = torch.tensor([0.5] * 4 + [2.0])
    weight = torch.zeros(6, 9)
    got = fold_delta(weight, torch.cat(downs), torch.cat(ups, dim=1), s)
    ref = 0.5 * ups[0] @ downs[0] + 2.0 * ups[1] @ downs[1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_runs_equal_zero_scales_for_inactive_columns():
    gen = torch.Generator().manual_seed(3)
    ranks = [2, 3, 4, 1]
    downs, ups = _factors(ranks, 6, 5, gen)
    x = torch.randn(3, 6, generator=gen)
    s = torch.rand(3, sum(ranks), generator=gen)
    runs = [(0, 2), (5, 10)]  # adapters 0, 2 and 3 live; adapter 1 (columns 2..5) inactive
    masked = s.clone()
    masked[:, 2:5] = 0
    full = stacked_delta(x, torch.cat(downs), torch.cat(ups, dim=1), masked)
    got = stacked_delta(x, torch.cat(downs), torch.cat(ups, dim=1), s, runs=runs)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
