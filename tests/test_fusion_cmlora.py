"""CMLoRA: frequency scores on synthetic images, the strategy against a hand-written diffusers/PEFT loop,
the caching schedule's pass counts, and the frequency cache."""

import copy
import hashlib
import json

import numpy as np
import pytest
import torch

from lora_composer.pipeline import ComposerPipeline
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.fusion.cmlora import CMLoRAStrategy
from lora_composer.fusion.frequency import (
    CACHE_FILE,
    amplitude_spectrum,
    high_frequency_score,
    profile_adapters,
    radial_profile,
)

PROMPT = "a red circle"
GUIDANCE = 5.0


# -- frequency scores ---------------------------------------------------------------------------------
def _grid(n=64):
    return torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")


def test_checkerboard_scores_above_smooth_images():
    y, x = _grid()
    checker = (x + y) % 2
    ramp = x / 63
    blob = torch.exp(-((x - 32) ** 2 + (y - 32) ** 2) / 200)
    noise = torch.rand(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s_checker, s_ramp, s_blob, s_noise = (high_frequency_score(im) for im in (checker, ramp, blob, noise))
    assert s_checker > 0.9 and s_ramp < 0.3 and s_blob < 0.3
    assert s_checker > s_noise > s_ramp  # white noise sits between the two extremes
    # contributions relative to a base: base + checkerboard detail outranks base + a smooth shift
    base = 0.5 * blob
    assert high_frequency_score(base + 0.1 * checker, base=base) > high_frequency_score(base + 0.1 * ramp, base=base)
    # channel-first RGB / latent-shaped input, and scale invariance
    rgb = torch.stack([checker, checker, 1 - checker])
    assert high_frequency_score(rgb) == pytest.approx(high_frequency_score(checker), abs=1e-9)
    assert high_frequency_score(10 * ramp) == pytest.approx(high_frequency_score(ramp), abs=1e-9)
    assert high_frequency_score(torch.zeros(8, 8)) == 0.0


def test_radial_profile_peaks_at_the_frequency_of_a_sinusoid():
    _, x = _grid()
    radii, profile = radial_profile(amplitude_spectrum(torch.cos(2 * torch.pi * 8 * x / 64), window=False))
    assert int(radii[1:][profile[1:].argmax()]) == 8


# -- schedule -----------------------------------------------------------------------------------------
def test_schedule_order_weights_and_fallback():
    s = CMLoRAStrategy()
    s.begin(["a", "b", "c"], [1.0, 1.0, 1.0], 8, StrategyContext())
    assert s.describe()["order_source"] == "given" and s.describe()["order"] == ["a", "b", "c"]
    assert [t for t in range(8) if s.refresh(t)] == [0, 2, 3, 6, 7]  # 2 on [0,3), 3 on [3,7), 2 on [7,8)
    s.begin(["a", "b", "c"], [1.0, 1.0, 1.0], 200, StrategyContext())
    assert sum(s.refresh(t) for t in range(200)) == 38 + 34 + 13
    assert s.switch_every == 20 and s.dom_weight == 2.5
    plan = s.plan(25, None)  # second interval: the second adapter dominates
    assert torch.allclose(plan.combine, torch.tensor([1 / 4.5, 2.5 / 4.5, 1 / 4.5], dtype=torch.float64))
    assert plan.reuse.tolist() == [True, False, True]  # 25 is not a refresh step (75 + 3k)

    s = CMLoRAStrategy(frequency_scores={"a": 0.1, "b": 0.9})  # c unscored: after the scored ones
    s.begin(["a", "b", "c"], [0.5, 1.0, 1.0], 8, StrategyContext())
    assert s.describe()["order"] == ["b", "a", "c"]
    assert s.plan(0, None).weights.tolist() == [[0, 1, 0], [0.5, 0, 0], [0, 0, 1]]
    assert get_strategy("cmlora", cache=False).name == "cmlora"
    with pytest.raises(Exception, match="cache_intervals"):
        get_strategy("cmlora", cache_intervals=(0, 1, 1))


# -- against diffusers + PEFT ------------------------------------------------------------------------
def reference(pipe, files, weights, order, steps, dominant, dom_weight, refresh):
    """Per denoiser call, one UNet pass per adapter alone (diffusers ``set_adapters``), combined as
    ``(w_dom * eps_dom + sum eps_other) / (w_dom + N - 1)``; non-dominant passes only on ``refresh`` steps."""
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    names, n = list(files), len(files)
    ref.set_adapters(names, adapter_weights=[weights[k] for k in names])  # the prompt sees every adapter
    cond, uncond = ref.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    embeds = torch.cat([uncond, cond])
    generator = torch.Generator().manual_seed(0)
    ref.scheduler.set_timesteps(steps)
    latents = ref.prepare_latents(1, 4, 64, 64, embeds.dtype, torch.device("cpu"), generator)
    preds = {}
    with torch.no_grad():
        for s, t in enumerate(ref.scheduler.timesteps):
            x = ref.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            dom, w = order[dominant(s)], dom_weight(s)
            for name in order:
                if name == dom or s in refresh or name not in preds:
                    ref.set_adapters([name], adapter_weights=[weights[name]])
                    preds[name] = ref.unet(x, t, encoder_hidden_states=embeds).sample
            eps = sum((w if k == dom else 1.0) / (w + n - 1) * preds[k] for k in order)
            e_uncond, e_text = eps.chunk(2)
            eps = e_uncond + GUIDANCE * (e_text - e_uncond)
            latents = ref.scheduler.step(eps, t, latents).prev_sample
        image = ref.vae.decode(latents / ref.vae.config.scaling_factor, return_dict=False)[0]
    return ref.image_processor.postprocess(image, output_type="np", do_denormalize=[True])


def _files(pipe, make_lora, n=3):
    return {k: make_lora(pipe, k, rank=4, alpha=8, seed=i + 1, conv=(i == 0)) for i, k in enumerate("abc"[:n])}


def _compose(pipe, files, weights, steps, **strategy_args):
    composer = ComposerPipeline(copy.deepcopy(pipe))
    call = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, height=64, width=64, output_type="np")
    max_batch = strategy_args.pop("max_batch", None)
    out = composer(
        PROMPT,
        loras=[(files[k], weights[k]) for k in files],
        strategy="cmlora",
        strategy_args=strategy_args,
        seed=0,
        progress=False,
        max_batch=max_batch,
        **call,
    )
    return composer, out


def test_uncached_matches_hand_written_formula(sd15_pipe, make_lora):
    files = _files(sd15_pipe, make_lora)
    weights = {"a": 0.8, "b": 0.6, "c": 1.0}
    scores = {"a": 0.2, "b": 0.1, "c": 0.7}  # high-frequency first: c, a, b
    composer, got = _compose(
        sd15_pipe, files, weights, 4, frequency_scores=scores, cache=False, switch_every=1, dom_decay=0.5
    )
    assert composer.last_record.strategy_args["order"] == ["c", "a", "b"]
    w_dom = [2.5, 2.0, 1.75, 1.625]  # N - 0.5, then minus 0.5, 0.25, 0.125 at each switch
    expected = reference(
        sd15_pipe,
        files,
        weights,
        ["c", "a", "b"],
        4,
        dominant=lambda s: s % 3,
        dom_weight=lambda s: w_dom[s],
        refresh=set(range(4)),
    )
    merged = ComposerPipeline(copy.deepcopy(sd15_pipe))(
        PROMPT,
        loras=[(files[k], weights[k]) for k in files],
        seed=0,
        progress=False,
        num_inference_steps=4,
        guidance_scale=GUIDANCE,
        height=64,
        width=64,
        output_type="np",
    )
    assert np.abs(expected - merged).max() > 1e-3  # differs from plain merging: the comparison means something
    assert np.abs(got - expected).max() < 1e-4
    assert composer.last_driver.calls == 4 and composer.last_driver.rows == 4 * 2 * 3


@pytest.mark.parametrize("max_batch", [None, 2])
def test_cached_passes_follow_the_schedule(sd15_pipe, make_lora, max_batch):
    files = _files(sd15_pipe, make_lora)
    weights = {"a": 1.0, "b": 0.7, "c": 0.9}
    composer, got = _compose(sd15_pipe, files, weights, 8, switch_every=3, max_batch=max_batch)
    refresh = {0, 2, 3, 6, 7}  # T=8: every 2 on [0, 3), every 3 on [3, 7), every 2 on [7, 8)
    computed = [1 + 2 * (s in refresh) for s in range(8)]  # the dominant always, the 2 others on refresh steps
    driver = composer.last_driver
    assert driver.rows == 2 * sum(computed)  # classifier-free guidance: 2 rows per group
    assert driver.calls == (8 if max_batch is None else sum(computed))
    if max_batch is None:
        expected = reference(
            sd15_pipe,
            files,
            weights,
            ["a", "b", "c"],
            8,
            dominant=lambda s: (s // 3) % 3,
            dom_weight=lambda s: 2.5,
            refresh=refresh,
        )
        assert np.abs(got - expected).max() < 1e-4
        _, uncached = _compose(sd15_pipe, files, weights, 8, switch_every=3, cache=False)
        assert np.abs(got - uncached).max() > 1e-6  # reuse changed something


# -- frequency cache ----------------------------------------------------------------------------------
def test_profile_is_cached_by_file_hash(sd15_pipe, make_lora, tmp_path, monkeypatch):
    files = {k: make_lora(sd15_pipe, k, rank=4, alpha=8, seed=i + 5, conv=True) for i, k in enumerate("ab")}
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    for path in files.values():
        composer.load_lora(path)
    renders = []
    real_call = ComposerPipeline.__call__

    def counting(self, *args, **kwargs):
        renders.append(kwargs.get("loras"))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(ComposerPipeline, "__call__", counting)
    cache = tmp_path / "freq"
    first = profile_adapters(composer, ["a", "b"], PROMPT, steps=2, seed=0, height=64, width=64, cache_dir=cache)
    assert len(renders) == 3 and set(first) == {"a", "b"} and all(0.0 <= v <= 1.0 for v in first.values())
    stored = json.loads((cache / CACHE_FILE).read_text())
    hashes = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()}
    assert set(stored) == set(hashes.values())
    assert all(stored[hashes[k]]["score"] == first[k] for k in files)

    again = profile_adapters(composer, ["b", "a"], PROMPT, steps=2, seed=0, height=64, width=64, cache_dir=cache)
    assert len(renders) == 3 and again == first  # no render the second time

    # the strategy orders from the cache when no scores are given
    stored[hashes["a"]]["score"], stored[hashes["b"]]["score"] = 0.1, 0.9
    (cache / CACHE_FILE).write_text(json.dumps(stored))
    composer(
        PROMPT,
        loras=[(files["a"], 1.0), (files["b"], 1.0)],
        strategy="cmlora",
        strategy_args={"frequency_cache": str(cache)},
        num_inference_steps=2,
        seed=0,
        height=64,
        width=64,
        output_type="np",
        progress=False,
    )
    assert composer.last_record.strategy_args["order"] == ["b", "a"]
    assert composer.last_record.strategy_args["order_source"] == "profile cache"


def test_arguments_from_the_command_line_are_parsed():
    from lora_composer.errors import ComposerError
    from lora_composer.fusion import get_strategy

    s = get_strategy("cmlora", cache_intervals="2,2,4", cache_bounds="0.25, 0.75", frequency_scores="a:0.1,b:0.9")
    assert s.cache_intervals == (2, 2, 4) and s.cache_bounds == (0.25, 0.75)
    assert s.frequency_scores == {"a": 0.1, "b": 0.9}
    with pytest.raises(ComposerError, match="cache_intervals"):
        get_strategy("cmlora", cache_intervals="2,x,2")
