"""The denoiser driver as a diffusers hook: composes with group offloading and a first-block cache, finds
the sample through the denoiser's signature, and leaves the denoiser as it found it."""

import contextlib
import copy

import numpy as np
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from lora_composer.adapters import load_adapter
import lora_composer.driver as driver_module
from lora_composer.driver import HOOK_NAME, DenoiserDriver
from lora_composer.fusion import get_strategy
from lora_composer.pipeline import ComposerPipeline
from lora_composer.runtime import LoraRuntime

PROMPT = "a red circle"
STEPS = 4
CALL = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, output_type="np", progress=False)
WEIGHTS = [1.0, 0.6, 0.8]


class UNetBlock(torch.nn.Module):
    """A "transformer block" that is a whole UNet evaluation, called with keyword arguments only:
    ``hidden_states + scale * eps(hidden_states)``. Registered below so a first-block cache accepts it."""

    def __init__(self, unet, scale: float):
        super().__init__()
        self.unet, self.scale, self.runs = unet, scale, 0

    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None):
        self.runs += 1
        eps = self.unet(
            sample=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False
        )[0]
        return hidden_states + self.scale * eps


TransformerBlockRegistry.register(UNetBlock, TransformerBlockMetadata(return_hidden_states_index=0))


class KeywordDenoiser(torch.nn.Module):
    """A DiT-style denoiser (``hidden_states``, ``transformer_blocks``) around the real UNet: its prediction is
    ``sum of the blocks' steps``; with one block of scale 1 it is exactly the UNet."""

    def __init__(self, unet, scales=(1.0,)):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(UNetBlock(unet, s) for s in scales)
        self.config = unet.config

    @property
    def dtype(self):
        return self.transformer_blocks[0].unet.dtype

    @property
    def device(self):
        return self.transformer_blocks[0].unet.device

    def forward(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states=None,
        timestep_cond=None,
        cross_attention_kwargs=None,
        added_cond_kwargs=None,
        return_dict=True,
    ):
        x = hidden_states
        for block in self.transformer_blocks:
            x = block(hidden_states=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states)
        sample = x - hidden_states
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


def _hooks(module):
    """Every hook registry under ``module`` as ``{module name: hook names in order}``."""
    return {n: list(m._diffusers_hook._hook_order) for n, m in module.named_modules() if hasattr(m, "_diffusers_hook")}


@contextlib.contextmanager
def cache_context(module, name):
    """What diffusers' DiT pipelines do around a denoiser call (the SD pipelines do not)."""
    _set_cache_context(module, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(module, None)


def _files(pipe, make_lora, n=3):
    return {name: make_lora(pipe, name, rank=4, alpha=4 + i, seed=i + 1) for i, name in enumerate("abc"[:n])}


def _composer(pipe, files):
    """A composer with ``files`` attached (before any denoiser swap: the LoRA keys name the UNet's layers)."""
    composer = ComposerPipeline(pipe)
    for path in files.values():
        composer.load_lora(path)
    return composer


def _run(composer, files, weights=WEIGHTS, **kwargs):
    loras = [(path, w) for path, w in zip(files.values(), weights)]
    return composer(PROMPT, loras=loras, seed=0, **{**CALL, **kwargs})


def _swap_denoiser(pipe, denoiser):
    pipe.__dict__["unet"] = denoiser  # no config re-registration: the test wrapper is not a diffusers model


# -- (a) group offloading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_gives_the_same_image(sd15_pipe, make_lora, offload_type):
    files = _files(sd15_pipe, make_lora)
    plain = _run(_composer(copy.deepcopy(sd15_pipe), files), files, strategy="composite")

    pipe = copy.deepcopy(sd15_pipe)
    cpu = torch.device("cpu")
    kw = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **kw)
    before, forward = _hooks(pipe.unet), pipe.unet.__dict__.get("forward")
    top = getattr(pipe.unet, "_diffusers_hook", None) and pipe.unet._diffusers_hook.get_hook("group_offloading")
    onloads = []
    if top is not None:  # the UNet's own group: its pre_forward runs once per pass that reaches the UNet
        inner = top.fn_ref.pre_forward
        top.fn_ref.pre_forward = lambda module, *a, **k: (onloads.append(1), inner(module, *a, **k))[1]
    composer = _composer(pipe, files)
    got = _run(composer, files, strategy="composite", max_batch=4)
    driver = composer.last_driver
    assert driver.calls == STEPS * 2 and driver.rows == STEPS * 2 * 3  # row groups {a, b} then {c}
    if top is not None:
        assert len(onloads) == driver.calls  # every pass of the driver went through the offloading hook
    assert np.abs(got - plain).max() < 1e-5
    assert _hooks(pipe.unet) == before and pipe.unet.__dict__.get("forward") is forward


# -- (b) first-block cache -----------------------------------------------------------------------------------


def fbc_composite_reference(pipe, files, weights, threshold):
    """PEFT adapters; per denoiser call, one pass per adapter alone, each under its own cache context (its
    own first-block cache state), averaged. Independent of the runtime and the driver."""
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    names = list(files)
    ref.set_adapters(names, weights)
    unet = ref.unet
    denoiser = KeywordDenoiser(unet, scales=(0.5, 0.5))
    apply_first_block_cache(denoiser, FirstBlockCacheConfig(threshold=threshold))
    forward = denoiser.forward

    def averaged(*args, **kwargs):
        outs = []
        for name, w in zip(names, weights):
            unet.set_adapters([name], [w])
            _set_cache_context(denoiser, CacheContext(f"cond/adapter {name}"))
            outs.append(forward(*args, **kwargs)[0])
        _set_cache_context(denoiser, CacheContext("cond"))
        return (sum(outs) / len(outs),)

    denoiser.forward = averaged
    _swap_denoiser(ref, denoiser)
    with cache_context(denoiser, "cond"):
        images = ref(
            prompt=PROMPT,
            generator=torch.Generator().manual_seed(0),
            **{k: v for k, v in CALL.items() if k != "progress"},
        ).images
    return images, sum(b.runs for b in denoiser.transformer_blocks)


def _cached_composer(pipe, files, threshold):
    composer = _composer(copy.deepcopy(pipe), files)
    denoiser = KeywordDenoiser(composer.pipe.unet, scales=(0.5, 0.5))
    apply_first_block_cache(denoiser, FirstBlockCacheConfig(threshold=threshold))
    _swap_denoiser(composer.pipe, denoiser)
    return composer, denoiser


THRESHOLD = 0.5  # chosen so the cache skips the second block on some steps and not on others


def test_first_block_cache_keeps_one_state_per_row_group_pass(sd15_pipe, make_lora):
    files = _files(sd15_pipe, make_lora)
    expected, ref_runs = fbc_composite_reference(sd15_pipe, files, WEIGHTS, THRESHOLD)
    # every pass runs the head block; the cache skipped the tail block on some passes, not on all
    assert 3 * STEPS < ref_runs < 2 * 3 * STEPS

    composer, denoiser = _cached_composer(sd15_pipe, files, THRESHOLD)
    with cache_context(denoiser, "cond"):
        before = _hooks(denoiser)
        # one row group per pass (max_batch = one CFG pair): the same passes and cache decisions as the reference
        got = _run(composer, files, strategy="composite", max_batch=2)
        assert _hooks(denoiser) == before
    runs = sum(b.runs for b in denoiser.transformer_blocks)
    assert composer.last_driver.calls == 3 * STEPS and runs == ref_runs
    assert np.abs(got - expected).max() < 1e-4

    # The comparison means something: without the cache the image differs.
    uncached, _ = fbc_composite_reference(sd15_pipe, files, WEIGHTS, threshold=0.0)
    assert np.abs(uncached - expected).max() > 1e-3


def test_first_block_cache_with_varying_batch(sd15_pipe, make_lora, monkeypatch):
    """All row groups in one pass (one state for the pass), and CMLoRA, whose passes carry 1 or 3 row groups
    (reuse): a cache state never meets a batch of another size, so it runs (a shared state would fail on the
    shapes), and the cache only ever skips work."""
    files = _files(sd15_pipe, make_lora, n=2)
    for strategy, kw in (("composite", {}), ("cmlora", {"strategy_args": {"switch_every": 2}})):
        plain, _ = _cached_composer(sd15_pipe, files, threshold=0.0)
        with cache_context(plain.pipe.unet, "cond"):
            reference = _run(plain, files, strategy=strategy, **kw)
        composer, denoiser = _cached_composer(sd15_pipe, files, THRESHOLD)
        with cache_context(denoiser, "cond"):
            got = _run(composer, files, strategy=strategy, **kw)
        driver = composer.last_driver
        assert driver.calls == plain.last_driver.calls and driver.rows == plain.last_driver.rows
        runs = sum(b.runs for b in denoiser.transformer_blocks)
        assert driver.calls <= runs <= 2 * driver.calls
        assert np.isfinite(got).all() and np.abs(got - reference).max() < 0.5
    if strategy == "cmlora":
        assert {p.row_groups for p in driver.history} == {2}  # plans stay 2 row groups, passes vary
        assert driver.rows < 2 * 2 * driver.calls

    # One cache state for every pass (no per-pass contexts) meets batches of 2 and 4 rows and fails.
    monkeypatch.setattr(driver_module, "_state_managers", lambda module: [])
    composer, denoiser = _cached_composer(sd15_pipe, files, THRESHOLD)
    with cache_context(denoiser, "cond"), pytest.raises(RuntimeError, match="size"):
        _run(composer, files, strategy="cmlora", strategy_args={"switch_every": 2})


# -- (c) a keyword-only denoiser -------------------------------------------------------------------------------


def test_keyword_denoiser_gives_the_plain_unet_image(sd15_pipe, make_lora):
    files = _files(sd15_pipe, make_lora)
    plain = _run(_composer(copy.deepcopy(sd15_pipe), files), files, strategy="composite")
    composer = _composer(copy.deepcopy(sd15_pipe), files)
    _swap_denoiser(composer.pipe, KeywordDenoiser(composer.pipe.unet))
    seen = []
    strat = get_strategy("composite")
    observe = strat.observe
    strat.observe = lambda step, t, inputs: (seen.append((t, sorted(inputs))), observe(step, t, inputs))[1]
    got = _run(composer, files, strategy=strat)
    assert composer.last_driver.calls == STEPS
    assert np.abs(got - plain).max() < 1e-5
    assert seen[0][0] == float(composer.pipe.scheduler.timesteps[0])
    assert {"hidden_states", "timestep", "encoder_hidden_states"} <= set(seen[0][1])


def test_keyword_only_call_and_positional_call_agree(sd15_pipe, make_lora):
    files = _files(sd15_pipe, make_lora, n=2)
    rt = LoraRuntime(sd15_pipe)
    for path in files.values():
        rt.add(load_adapter(path))
    names = list(rt.adapters)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor(500)
    wrapper = KeywordDenoiser(sd15_pipe.unet)

    def drive(module, *args, **kwargs):
        strat = get_strategy("composite")
        strat.begin(names, [1.0, 0.5], 1)
        with DenoiserDriver(rt, module, strat, names) as driver:
            out = module(*args, **kwargs)
        assert driver.calls == 1 and driver.rows == 4
        return out[0] if isinstance(out, tuple) else out.sample

    positional = drive(sd15_pipe.unet, x, t, e)
    keywords = drive(wrapper, hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)
    mixed = drive(sd15_pipe.unet, x, timestep=t, encoder_hidden_states=e)
    torch.testing.assert_close(keywords, positional, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed, positional, atol=1e-5, rtol=1e-5)


# -- (d) the denoiser as it was --------------------------------------------------------------------------------


def test_denoiser_is_restored_exactly(sd15_pipe):
    unet = sd15_pipe.unet
    rt = LoraRuntime(sd15_pipe)
    strat = get_strategy("merge")
    strat.begin([], [], 1)
    assert "forward" not in vars(unet) and not hasattr(unet, "_diffusers_hook")
    with DenoiserDriver(rt, unet, strat, []):
        assert unet._diffusers_hook._hook_order == [HOOK_NAME]
    assert "forward" not in vars(unet) and not hasattr(unet, "_diffusers_hook")

    # another hook already there: it stays, with the same forward on the instance
    apply_first_block_cache(wrapper := KeywordDenoiser(unet, (0.5, 0.5)), FirstBlockCacheConfig(0.1))
    unet.enable_group_offload(
        onload_device="cpu", offload_device="cpu", offload_type="block_level", num_blocks_per_group=1
    )
    before, forward = _hooks(wrapper), unet.__dict__["forward"]
    with DenoiserDriver(rt, unet, strat, []):
        assert unet._diffusers_hook._hook_order[-1] == HOOK_NAME
    assert _hooks(wrapper) == before and unet.__dict__["forward"] is forward

    # an instance-level forward (accelerate's hooks do this) is put back as it was
    plain = torch.nn.Linear(2, 2)
    custom = plain.forward
    plain.forward = custom
    with DenoiserDriver(rt, plain, strat, []):
        pass
    assert plain.__dict__["forward"] is custom and not hasattr(plain, "_diffusers_hook")
