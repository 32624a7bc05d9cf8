"""SHiRA sparse adapters: PEFT checkpoints, our format, scatter fusing with exact restore, conversions."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lora_composer import tiny
from lora_composer.adapters import load_adapter, save_shira
from lora_composer.adapters.shira import lora_to_shira, squeeze_lora
from lora_composer.adapters.types import Adapter, LayerDelta, SparseDelta
from lora_composer.runtime import LoraRuntime
from lora_composer.kernels.sparse_ops import sparse_fold, sparse_restore

TARGETS = list(tiny.SD15_TARGETS)


def unet_call(unet, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    ehs = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(sample, torch.tensor(500), encoder_hidden_states=ehs).sample


def _target_linears(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(tuple(TARGETS))}


def _base_weights(unet):
    return {n: m.weight.detach().clone() for n, m in _target_linears(unet).items()}


def random_shira(unet, name, seed, density=0.02, family="sd15") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for path, m in _target_linears(unet).items():
        out_f, in_f = m.weight.shape
        k = max(1, int(density * out_f * in_f))
        flat = torch.randperm(out_f * in_f, generator=g)[:k]
        deltas[f"unet.{path}"] = SparseDelta(
            torch.stack([flat // in_f, flat % in_f]), torch.randn(k, generator=g), (out_f, in_f)
        )
    return Adapter(name, family, deltas)


@pytest.fixture(scope="module")
def peft_shira(_sd15_template, tmp_path_factory):
    """A SHiRA adapter trained a few steps with PEFT on the tiny UNet, saved with ``save_pretrained``."""
    from peft import ShiraConfig, get_peft_model

    unet = copy.deepcopy(_sd15_template.unet)
    model = get_peft_model(unet, ShiraConfig(r=2, target_modules=TARGETS, random_seed=3))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    ehs = torch.randn(1, 7, unet.config.cross_attention_dim, generator=gen)
    target = torch.randn(1, 4, 8, 8, generator=gen)
    for _ in range(3):
        opt.zero_grad()
        loss = (model(sample, torch.tensor(500), encoder_hidden_states=ehs).sample - target).pow(2).mean()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("peft") / "shira_adapter"
    model.save_pretrained(str(folder))
    merged = model.merge_and_unload().eval()
    return folder, merged


def test_peft_shira_loads_and_matches_peft_merged(sd15_pipe, peft_shira):
    folder, merged = peft_shira
    adapter = load_adapter(folder)
    assert adapter.is_sparse and adapter.metadata.source_format == "peft-shira"
    assert all(k.startswith("unet.") for k in adapter.deltas)
    base = _base_weights(sd15_pipe.unet)
    want = unet_call(merged)
    rt = LoraRuntime(sd15_pipe)
    rt.add(adapter)
    rt.set_weights(unet={adapter.name: 1.0})
    unfused = unet_call(sd15_pipe.unet)
    assert (want - unet_call(copy.deepcopy(sd15_pipe.unet).requires_grad_(False))).abs().max() < 1e-5
    torch.testing.assert_close(unfused, want, atol=1e-5, rtol=0)
    rt.fuse()
    torch.testing.assert_close(unet_call(sd15_pipe.unet), want, atol=1e-5, rtol=0)
    merged_w = {n: m.weight for n, m in _target_linears(merged).items()}
    for n, m in _target_linears(sd15_pipe.unet).items():
        torch.testing.assert_close(m.weight, merged_w[n], atol=1e-6, rtol=0)
    rt.unfuse()
    assert all(torch.equal(m.weight, base[n]) for n, m in _target_linears(sd15_pipe.unet).items())


def test_our_format_roundtrip_and_load_dispatch(sd15_pipe, tmp_path):
    a = random_shira(sd15_pipe.unet, "s", seed=0)
    a.deltas[next(iter(a.deltas))].alpha = 0.5
    path = save_shira(a, tmp_path / "s.safetensors")
    b = load_adapter(path)
    assert b.metadata.source_format == "shira" and b.family == "sd15" and b.is_sparse
    for k, d in a.deltas.items():
        e = b.deltas[k]
        assert e.shape == d.shape and e.alpha == d.alpha
        assert torch.equal(e.dense(), d.dense())


def test_several_shira_fused_weighted_equal_dense_and_unfused(sd15_pipe):
    unet = sd15_pipe.unet
    adapters = [random_shira(unet, f"s{i}", seed=10 + i, density=0.05) for i in range(3)]
    weights = {"s0": 0.7, "s1": -0.4, "s2": 1.3}
    base = _base_weights(unet)
    rt = LoraRuntime(sd15_pipe)
    for a in adapters:
        rt.add(a)
    rt.set_weights(unet=weights)
    unfused = unet_call(unet)
    rt.fuse()
    for path, m in _target_linears(unet).items():
        want = base[path] + sum(w * adapters[i].deltas[f"unet.{path}"].dense() for i, w in enumerate(weights.values()))
        torch.testing.assert_close(m.weight, want, atol=1e-6, rtol=0)
    # random N(0, 1) sparse values at 5% density move the output far: fp32 rounding differs by a few 1e-5
    torch.testing.assert_close(unet_call(unet), unfused, atol=1e-4, rtol=0)
    # per-row weights, unfused: each row equals its own uniform run
    rt.unfuse()
    rt.set_denoiser_rows(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]]))
    rows = unet_call(unet)
    rt.set_weights(unet={"s0": 1.0})
    torch.testing.assert_close(rows[0], unet_call(unet)[0], atol=1e-4, rtol=0)
    rt.set_weights(unet={"s1": 0.5, "s2": 1.0})
    torch.testing.assert_close(rows[1], unet_call(unet)[1], atol=1e-4, rtol=0)


def _assert_fresh_fold(rt, unet, base):
    """Every fused weight is bit-identical to folding the layer's live SHiRA values into ``base`` from scratch."""
    for path, m in _target_linears(unet).items():
        idx, vals = rt.layers[f"unet.{path}"].sparse_refresh()
        want = base[path].clone()
        sparse_fold(want, idx, vals[0])
        assert torch.equal(m.weight, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_1000_random_fused_switches_restore_exactly(sd15_pipe, dtype):
    unet = sd15_pipe.unet.to(dtype)
    base = _base_weights(unet)
    rt = LoraRuntime(sd15_pipe)
    names = [f"s{i}" for i in range(5)]
    for i, n in enumerate(names):
        rt.add(random_shira(unet, n, seed=100 + i))
    rng = random.Random(0)
    for step in range(1000):
        chosen = rng.sample(names, rng.randint(1, 3))
        rt.set_weights(unet={n: rng.choice([1.0, 0.5, -0.8, 1.7]) for n in chosen})
        rt.fuse()
        if step % 250 == 0 or step > 995:  # the fused weight is a fresh fold of the base, cached values or not
            assert any(not torch.equal(m.weight, base[p]) for p, m in _target_linears(unet).items())
            _assert_fresh_fold(rt, unet, base)
    rt.unfuse()
    assert all(torch.equal(m.weight, base[p]) for p, m in _target_linears(unet).items())
    assert all(layer.sparse_backup is None and layer.backup is None for layer in rt.layers.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sparse_fold_rounds_once_and_restores_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=g).to(dtype)
    before = weight.clone()
    idx = torch.randperm(weight.numel(), generator=g)[:97].sort().values
    values = torch.randn(97, generator=g) * 1e-3
    backup = sparse_fold(weight, idx, values)
    assert torch.equal(backup, before.view(-1)[idx])
    assert torch.equal(weight.view(-1)[idx], (before.view(-1)[idx].float() + values).to(dtype))
    untouched = torch.ones(weight.numel(), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(weight.view(-1)[untouched], before.view(-1)[untouched])
    sparse_restore(weight, idx, backup)
    assert torch.equal(weight, before)
    folded = (before.view(-1)[idx].float() + values).to(dtype)
    assert sparse_fold(weight, idx, values, backup=backup) is backup  # known values: no gather, same fold
    assert torch.equal(weight.view(-1)[idx], folded)
    sparse_restore(weight, idx, backup)
    assert torch.equal(weight, before)


def test_fused_switch_reads_the_weight_again_after_unfuse(sd15_pipe):
    """Values kept between fused switches belong to one fused session: a base changed while unfused is used."""
    unet = sd15_pipe.unet
    rt = LoraRuntime(sd15_pipe)
    for i in range(2):
        rt.add(random_shira(unet, f"s{i}", seed=40 + i))
    rt.set_weights(unet={"s0": 1.0})
    rt.fuse()
    rt.set_weights(unet={"s1": 1.0})
    rt.set_weights(unet={"s0": 1.0})  # the second fold of s0 in this session: one scatter, no gather
    rt.unfuse()
    with torch.no_grad():
        for m in _target_linears(unet).values():
            m.weight.mul_(0.5)
    changed = _base_weights(unet)
    rt.fuse()
    _assert_fresh_fold(rt, unet, changed)
    rt.unfuse()
    assert all(torch.equal(m.weight, changed[p]) for p, m in _target_linears(unet).items())
    rt.remove("s0")
    rt.remove("s1")


def test_shira_and_lora_on_same_layers_fuse_and_restore(sd15_pipe):
    unet = sd15_pipe.unet
    base = _base_weights(unet)
    layers = tiny.random_lora_layers(sd15_pipe, seed=3, text_encoder=False)["unet"]
    deltas = {
        f"unet.{k[: -len('.lora_A.weight')]}": LayerDelta(v, layers[k.replace("lora_A", "lora_B")], 4.0)
        for k, v in layers.items()
        if k.endswith(".lora_A.weight")
    }
    rt = LoraRuntime(sd15_pipe)
    rt.add(Adapter("lora", "sd15", deltas))
    rt.add(random_shira(unet, "s", seed=5))
    rt.set_weights(unet={"lora": 0.6, "s": 0.9})
    unfused = unet_call(unet)
    rt.fuse()
    torch.testing.assert_close(unet_call(unet), unfused, atol=1e-5, rtol=0)
    rt.set_weights(unet={"s": 1.0})  # refuse: only the sparse one
    rt.set_weights(unet={"lora": 1.0})
    rt.unfuse()
    assert all(torch.equal(m.weight, base[p]) for p, m in _target_linears(unet).items())
    rt.remove("s")
    rt.remove("lora")
    assert not rt.layers


def test_lora_to_shira_keeps_largest_entries_and_reports_error(sd15_pipe):
    layers = tiny.random_lora_layers(sd15_pipe, rank=4, seed=7, text_encoder=False)["unet"]
    deltas = {
        f"unet.{k[: -len('.lora_A.weight')]}": LayerDelta(v, layers[k.replace("lora_A", "lora_B")], 4.0)
        for k, v in layers.items()
        if k.endswith(".lora_A.weight")
    }
    lora = Adapter("l", "sd15", deltas)
    shira, reports = lora_to_shira(lora, density=0.1)
    for r in reports:
        d, s = lora.deltas[r.key], shira.deltas[r.key]
        dense = (d.up.float() * d.scale) @ d.down.float()
        assert s.nnz == round(0.1 * dense.numel())
        kept = s.dense()
        smallest_kept = kept[kept != 0].abs().min()
        assert dense[kept == 0].abs().max() <= smallest_kept + 1e-7
        err = float((dense - kept).norm() / dense.norm())
        assert abs(err - r.rel_error) < 1e-5 and 0 < r.rel_error < 1
    full, _ = lora_to_shira(lora, density=1.0)
    assert all(r.rel_error < 1e-6 for r in lora_to_shira(lora, density=1.0)[1]) and full.is_sparse


def test_squeeze_rank_and_energy():
    g = torch.Generator().manual_seed(0)
    # rank-8 delta whose spectrum decays: 4 strong directions, 4 weak ones
    u, _ = torch.linalg.qr(torch.randn(40, 8, generator=g))
    v, _ = torch.linalg.qr(torch.randn(24, 8, generator=g))
    s = torch.tensor([10.0, 8, 6, 5, 0.1, 0.1, 0.05, 0.01])
    d = LayerDelta((v * s.sqrt()).T.contiguous(), (u * s.sqrt()).contiguous(), 8.0)
    conv = LayerDelta(torch.randn(6, 5, 3, 3, generator=g), torch.randn(7, 6, 1, 1, generator=g), 3.0)
    lora = Adapter("l", "sd15", {"unet.a.to_q": d, "unet.b.conv": conv})
    out, reports = squeeze_lora(lora, rank=4)
    assert out.deltas["unet.a.to_q"].rank == 4 and out.deltas["unet.b.conv"].rank == 4
    assert out.deltas["unet.b.conv"].down.shape == (4, 5, 3, 3) and out.deltas["unet.b.conv"].up.shape == (7, 4, 1, 1)
    r = next(r for r in reports if r.key == "unet.a.to_q")
    want = float((s[:4] ** 2).sum() / (s**2).sum())
    assert abs(r.energy - want) < 1e-4 and r.rel_error < 0.02
    auto, reports = squeeze_lora(lora, energy=0.99)
    assert auto.deltas["unet.a.to_q"].rank == 4
    assert all(r.energy >= 0.99 - 1e-6 for r in reports)
    with pytest.raises(ValueError):
        squeeze_lora(lora)


# -- Conv2d (LoCon) SHiRA ------------------------------------------------------------------------------------
def _convs(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}


def random_conv_shira(unet, name, seed, density=0.05, std=0.02) -> Adapter:
    """Sparse deltas on every Conv2d of the UNet (3x3, 1x1, strided), shaped ``[out, in, kh, kw]``."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for path, m in _convs(unet).items():
        shape = tuple(m.weight.shape)
        cols = shape[1] * shape[2] * shape[3]
        k = max(1, int(density * shape[0] * cols))
        flat = torch.randperm(shape[0] * cols, generator=g)[:k]
        deltas[f"unet.{path}"] = SparseDelta(
            torch.stack([flat // cols, flat % cols]), torch.randn(k, generator=g) * std, shape
        )
    return Adapter(name, "sd15", deltas)


def test_conv_shira_fused_equals_formula_and_unfused_and_restores_exactly(sd15_pipe, one_thread):
    unet = sd15_pipe.unet
    convs = _convs(unet)
    base = {n: m.weight.detach().clone() for n, m in convs.items()}
    adapter = random_conv_shira(unet, "c", seed=1)
    assert all(d.is_conv for d in adapter.deltas.values()) and len(adapter.deltas) == len(convs)
    plain = unet_call(unet)
    rt = LoraRuntime(sd15_pipe)
    rt.add(adapter)
    rt.set_weights(unet={"c": 1.0})
    unfused = unet_call(unet)
    assert (unfused - plain).abs().max() > 1e-3  # it acts
    rt.fuse()
    for path, m in convs.items():  # W0 + scatter(indices, values), from the definition: row, flattened kernel column
        d = adapter.deltas[f"unet.{path}"]
        out_c, in_c, kh, kw = m.weight.shape
        want = base[path].clone().reshape(out_c, in_c * kh * kw)
        want[d.indices[0], d.indices[1]] += d.values
        assert torch.equal(m.weight, want.reshape(out_c, in_c, kh, kw)), path
    torch.testing.assert_close(unet_call(unet), unfused, atol=1e-5, rtol=0)
    rt.set_weights(unet={"c": -0.6})  # a fused switch, then back to the base
    rt.unfuse()
    assert all(torch.equal(m.weight, base[n]) for n, m in convs.items())
    rt.remove("c")
    assert not rt.layers and all(torch.equal(m.weight, base[n]) for n, m in convs.items())


def test_conv_and_linear_shira_weighted_and_per_row(sd15_pipe, one_thread):
    """Conv and Linear SHiRA adapters mixed with LoRA weights: fused equals unfused, per-row rows equal their runs."""
    unet = sd15_pipe.unet
    rt = LoraRuntime(sd15_pipe)
    rt.add(random_conv_shira(unet, "c0", seed=2))
    rt.add(random_conv_shira(unet, "c1", seed=3, density=0.1))
    rt.add(random_shira(unet, "s", seed=4, density=0.02))
    rt.set_weights(unet={"c0": 0.7, "c1": -0.4, "s": 0.05})
    unfused = unet_call(unet)
    rt.fuse()
    torch.testing.assert_close(unet_call(unet), unfused, atol=1e-5, rtol=0)
    rt.unfuse()
    rt.set_denoiser_rows(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.05]]))
    rows = unet_call(unet)
    rt.set_weights(unet={"c0": 1.0})
    torch.testing.assert_close(rows[0], unet_call(unet)[0], atol=1e-5, rtol=0)
    rt.set_weights(unet={"c1": 0.5, "s": 0.05})
    torch.testing.assert_close(rows[1], unet_call(unet)[1], atol=1e-5, rtol=0)


def test_conv_shira_roundtrip_and_conversion_keeps_kernel_entries(sd15_pipe, tmp_path):
    a = random_conv_shira(sd15_pipe.unet, "c", seed=5)
    b = load_adapter(save_shira(a, tmp_path / "c.safetensors"))
    for k, d in a.deltas.items():
        assert b.deltas[k].shape == d.shape and b.deltas[k].is_conv and torch.equal(b.deltas[k].dense(), d.dense())
    g = torch.Generator().manual_seed(0)
    conv = LayerDelta(torch.randn(4, 6, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g), 2.0)
    shira, (report,) = lora_to_shira(Adapter("l", "sd15", {"unet.x.conv1": conv}), density=0.1)
    s = shira.deltas["unet.x.conv1"]
    full = torch.einsum("or,rikl->oikl", conv.up[:, :, 0, 0], conv.down) * conv.scale  # the LoCon delta, 4-D
    kept = s.dense()
    assert s.shape == (5, 6, 3, 3) and s.nnz == round(0.1 * full.numel()) and kept.shape == full.shape
    assert torch.allclose(kept[kept != 0], full[kept != 0], atol=1e-6)
    assert full[kept == 0].abs().max() <= kept[kept != 0].abs().min() + 1e-6
    assert abs(report.rel_error - float((full - kept).norm() / full.norm())) < 1e-5


def _write_bad(tmp_path, name, unet, **change):
    """A one-layer conv SHiRA file for ``up_blocks.0.resnets.0.conv1`` with one field made wrong."""
    from safetensors.torch import save_file

    key = "unet.up_blocks.0.resnets.0.conv1"
    shape = list(_convs(unet)[key[5:]].weight.shape)
    tensors = {
        f"{key}.shira_indices": torch.tensor([[0, 3], [5, 700]]),
        f"{key}.shira_weight": torch.tensor([0.1, -0.2]),
        f"{key}.shira_shape": torch.tensor(shape),
        f"{key}.alpha": torch.tensor(1.0),
    }
    tensors.update({f"{key}.{k}": v for k, v in change.items()})
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"lora_composer.format": "shira"})
    return path, key


@pytest.mark.parametrize("bad", ["index", "shape", "nan"])
def test_malformed_conv_shira_fails_in_one_line_and_leaves_the_pipeline_as_it_was(sd15_pipe, tmp_path, bad):
    from lora_composer.errors import ComposerError
    from lora_composer.pipeline import ComposerPipeline

    unet = sd15_pipe.unet
    good, _ = _write_bad(tmp_path, "good", unet)
    change = {
        "index": {"shira_indices": torch.tensor([[0, 3], [5, 64 * 128 * 9]])},  # column past in * kh * kw
        "shape": {"shira_shape": torch.tensor([64, 128, 5, 5])},  # the layer is 3x3: refused when attached
        "nan": {"shira_weight": torch.tensor([0.1, float("nan")])},
    }[bad]
    path, key = _write_bad(tmp_path, bad, unet, **change)
    pipe = ComposerPipeline(sd15_pipe)
    pipe.load_lora(good)
    pipe.runtime.set_weights(unet={"good": 1.0})
    pipe.runtime.fuse()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ComposerError) as exc:
        pipe.load_lora(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and key in msg, msg
    assert set(pipe.adapters) == {"good"} and pipe.runtime.fused
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_sparse_conv_delta_per_row_equals_dense_conv():
    """Rows sharing values share a convolution, zero rows add nothing: each row still equals its dense conv."""
    from lora_composer.kernels.sparse_ops import sparse_conv_delta

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 9, 9, generator=g)
    shape, conv = (5, 6, 3, 3), dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    idx = torch.randperm(270, generator=g)[:40].sort().values
    v = torch.randn(40, generator=g)
    values = torch.stack([v, v, torch.zeros(40), -0.5 * v])
    got = sparse_conv_delta(x, idx, values, shape, conv)
    for b in range(4):
        kernel = torch.zeros(270)
        kernel[idx] = values[b]
        want = torch.nn.functional.conv2d(x[b : b + 1], kernel.view(shape), **conv)
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-6, rtol=0)
    one_row = sparse_conv_delta(x, idx, values[:1], shape, conv)
    torch.testing.assert_close(sparse_conv_delta(x, idx, v, shape, conv), one_row)
