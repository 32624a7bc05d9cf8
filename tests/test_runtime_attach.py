"""Attaching many adapters: stacks that grow by doubling give the same outputs as a hand-computed dense
delta, survive removals in the middle, copy each layer's stack O(log K) times; the fuse cost model picks
fusing only when it pays, and ``fuse="auto"`` restores the base weights bit-exactly."""

import copy

import torch

from lora_composer import tiny
from lora_composer.adapters.types import Adapter, LayerDelta
from lora_composer.runtime import LoraRuntime


def _adapter(pipe, name, seed, rank=2):
    layers = tiny.random_lora_layers(pipe, rank=rank, seed=seed, text_encoder=False)
    deltas = {}
    for comp, sd in layers.items():
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                deltas[f"{comp}.{module}"] = LayerDelta(down, sd[f"{module}.lora_B.weight"], float(rank))
    return Adapter(name, "sd15", deltas)


def _unet_out(pipe, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    ehs = torch.randn(2, 7, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor(500), encoder_hidden_states=ehs).sample


def _dense_reference(clean, adapters, weights):
    """The expected output computed independently: each delta folded by hand into a copy of ``clean`` (a copy
    of the pipeline taken before any runtime patched it: a patched one would carry its hooks along)."""
    ref = copy.deepcopy(clean)
    modules = dict(ref.unet.named_modules())
    with torch.no_grad():
        for ad in adapters:
            w = weights.get(ad.name, 0.0)
            for key, d in ad.deltas.items():
                m = modules[key.split(".", 1)[1]]
                m.weight += (
                    w * d.scale * (d.up.reshape(d.up.shape[0], -1) @ d.down.reshape(d.rank, -1)).reshape(m.weight.shape)
                )
    return _unet_out(ref)


def test_many_attaches_match_a_dense_reference_and_grow_by_doubling(sd15_pipe):
    pipe = sd15_pipe
    clean = copy.deepcopy(pipe)
    adapters = [_adapter(pipe, f"a{i}", seed=10 + i) for i in range(9)]
    rt = LoraRuntime(pipe)
    layer_key = next(iter(adapters[0].deltas))
    reallocations, last_ptr = 0, None
    for ad in adapters:
        rt.add(ad)
        store = getattr(rt.layers[layer_key].module, "_lora_composer_down")
        reallocations += store.data_ptr() != last_ptr
        last_ptr = store.data_ptr()
    layer = rt.layers[layer_key]
    assert layer.rank == 9 * 2 and layer.capacity == 32  # 2, 4, 8, 16, 32: doubled, never one copy per attach
    assert reallocations == 5
    assert tuple(layer.down.shape) == (18, *layer.module.weight.shape[1:]) and layer.up.shape[1] == 18
    weights = {"a0": 0.5, "a3": 1.0, "a8": -0.7}
    rt.set_weights(unet=weights)
    want = _dense_reference(clean, adapters, weights)
    got = _unet_out(pipe)
    assert (got - want).abs().max() < 1e-5 and (want - _unet_out(clean)).abs().max() > 1e-3


def test_a_reserved_stack_is_never_copied_up_to_its_reserve(sd15_pipe):
    rt = LoraRuntime(sd15_pipe, reserve=4)
    ptrs = set()
    for i in range(5):
        rt.add(_adapter(sd15_pipe, f"r{i}", seed=90 + i))
        layer = next(iter(rt.layers.values()))
        ptrs.add(getattr(layer.module, "_lora_composer_down").data_ptr())
        if i < 4:
            assert layer.capacity == 8 and len(ptrs) == 1  # 4 adapters of rank 2, allocated once
    assert layer.capacity == 16 and len(ptrs) == 2  # the 5th doubles it


def test_removal_in_the_middle_then_more_attaches(sd15_pipe):
    pipe = sd15_pipe
    clean = copy.deepcopy(pipe)
    adapters = [_adapter(pipe, f"a{i}", seed=30 + i) for i in range(6)]
    base = _unet_out(pipe)
    rt = LoraRuntime(pipe)
    for ad in adapters[:5]:
        rt.add(ad)
    rt.remove("a1")
    rt.remove("a3")
    rt.add(adapters[5])  # takes a freed slot; its columns go after the compacted ones
    weights = {"a0": 0.3, "a2": 1.0, "a4": 0.6, "a5": 0.9}
    rt.set_weights(unet=weights)
    want = _dense_reference(clean, [adapters[i] for i in (0, 2, 4, 5)], weights)
    assert (_unet_out(pipe) - want).abs().max() < 1e-5
    layer = next(iter(rt.layers.values()))
    assert layer.rank == 8 and layer.capacity >= 8
    rt.clear()
    assert torch.equal(_unet_out(pipe), base)


def test_fuse_cost_model_and_auto_fuse_restores_bit_exactly(sd15_pipe):
    pipe = sd15_pipe
    rt = LoraRuntime(pipe)
    for i in range(3):
        rt.add(_adapter(pipe, f"m{i}", seed=50 + i, rank=4))
    rt.set_weights(unet={"m0": 1.0, "m1": 0.7, "m2": 0.5})
    assert not rt.fuse_saves(steps=1, rows=1, tokens=1)  # a fold costs more than one tiny call
    assert rt.fuse_saves(steps=50, rows=2, tokens=4096)  # a real render: the fold pays for itself
    _unet_out(pipe)  # the layers record their positions per row
    assert all(layer.tokens for layer in rt.layers.values())
    assert rt.fuse_saves(steps=50, rows=2) and not rt.fuse_saves(steps=0, rows=2)
    rt.set_denoiser_rows(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert not rt.fuse_saves(steps=50, rows=2)  # per-row weights cannot be fused


def test_pipeline_fuse_auto_equals_unfused_and_restores(sd15_pipe, tmp_path, make_lora):
    from lora_composer.pipeline import ComposerPipeline

    paths = [make_lora(sd15_pipe, f"l{i}", seed=70 + i, text_encoder=False) for i in range(3)]
    params = {n: p.detach().clone() for n, p in sd15_pipe.unet.named_parameters()}
    cp = ComposerPipeline(sd15_pipe)
    loras = [(str(p), w) for p, w in zip(paths, (1.0, 0.7, 0.5))]
    kw = dict(num_inference_steps=3, seed=4, height=32, width=32, output_type="np", progress=False)
    plain = cp("a cat", loras=loras, **kw)
    called = []
    original = cp.runtime.fuse
    cp.runtime.fuse = lambda: (called.append(1), original())[1]
    auto = cp("a cat", loras=loras, fuse="auto", **kw)
    assert called, "fuse='auto' did not fuse a 3-step 32x32 render"
    assert abs(auto - plain).max() < 1e-4
    assert all(torch.equal(p, params[n]) for n, p in sd15_pipe.unet.named_parameters())
