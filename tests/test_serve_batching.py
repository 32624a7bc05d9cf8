"""Step-level batching on the mini world (fp32): requests with different LoRA sets share denoiser passes, one
joins mid-way, and each image equals its solo render through ComposerPipeline (an independent pipeline)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lora_composer.pnginfo import RECORD_KEY, GenerationRecord
from lora_composer.serving.adapter_cache import AdapterCache
from lora_composer.serving.batcher import Batcher
from lora_composer.serving.jobs import Job, RenderSpec
from lora_composer.serving.residency import Residency


@pytest.fixture(scope="module")
def world(home):
    from tests.serve_world import pipelines

    return pipelines()


def _solo(solo, spec: RenderSpec) -> np.ndarray:
    out = solo(
        spec.prompt,
        loras=[(str(p), w) for p, w in spec.loras],
        num_inference_steps=spec.steps,
        strategy=spec.strategy,
        strategy_args=spec.strategy_args,
        guidance_scale=spec.guidance,
        seed=spec.seed,
        height=spec.height,
        width=spec.width,
        output_type="np",
        progress=False,
    )
    return out[0]


def _png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255


def test_batched_requests_equal_their_solo_renders(world):
    serving, solo, library = world
    serving.unload_all()
    cache = AdapterCache(64 << 20)
    serving.adapter_loader = cache.load
    residency = Residency(serving, max_bytes=64 << 20)
    batcher = Batcher(serving, residency, max_batch=4)

    def lib(name):
        return library / f"{name}.safetensors"

    specs = [
        RenderSpec(
            "a purple star on a striped background",
            loras=[(lib("star-shape"), 1.0), (lib("purple-colour"), 0.8)],
            seed=11,
            steps=4,
            guidance=5.0,
        ),
        RenderSpec(
            "blinky on a wavy background",
            loras=[(lib("blinky-character"), 1.0), (lib("wavy-bg"), 1.0)],
            seed=12,
            steps=4,
            guidance=5.0,
        ),
        RenderSpec(
            "an orange cross",
            loras=[(lib("orange-colour"), 1.0), (lib("cross-shape"), 0.9)],
            seed=13,
            steps=3,
            guidance=5.0,
        ),
        RenderSpec("a red circle", loras=[], seed=14, steps=3, guidance=1.0),  # no guidance: one row, no LoRA
    ]
    try:
        first = [batcher.submit(s) for s in specs[:2]]
        while not any(e["event"] == "step" for e in first[0].events_after(0, 5.0)):
            pass
        late = [batcher.submit(s) for s in specs[2:]]  # arrive while the first two are mid-way
        jobs = first + late
        for job in jobs:
            assert job.wait(120), job.summary()
        assert [j.status for j in jobs] == ["done"] * 4, [j.error for j in jobs]
        assert first[0].events[1]["event"] == "started"
        late_start = late[0].events.index(next(e for e in late[0].events if e["event"] == "started"))
        assert late_start == 1
        # the late ones joined a batch already running: they shared passes with the first two
        assert all(j.batched_with >= 1 for j in jobs)
        assert (
            batcher.metrics.batch_requests.n > 0
            and max(
                edge
                for edge, c in zip(batcher.metrics.batch_requests.buckets, batcher.metrics.batch_requests.counts)
                if c == batcher.metrics.batch_requests.n
            )
            >= 3
        )
        for job, spec in zip(jobs, specs):
            want = _solo(solo, spec)
            got = _png_array(job.png)
            # the PNG holds the same 8-bit image as the solo render (rounding of values within 1e-4 aside)
            assert np.abs(got - np.round(want * 255) / 255).max() <= 1 / 255 + 1e-6
            assert np.abs(job.array - want).max() < 1e-4, spec.prompt
            record = GenerationRecord.from_json(Image.open(io.BytesIO(job.png)).text[RECORD_KEY])
            assert record.seed == spec.seed and [lo["name"] for lo in record.loras] == [p.stem for p, _ in spec.loras]
        # a LoRA really acted: the first request's image is not the base model's
        base = _solo(solo, RenderSpec(specs[0].prompt, loras=[], seed=11, steps=4, guidance=5.0))
        assert np.abs(jobs[0].array - base).max() > 0.05
        assert cache.misses == 6 and cache.hits == 0
    finally:
        batcher.close()


def test_residency_evicts_least_recently_used_but_never_a_running_one(world):
    serving, _, library = world
    cache = AdapterCache(64 << 20)
    serving.adapter_loader = cache.load
    serving.unload_all()
    residency = Residency(serving, max_bytes=64 << 20, max_adapters=2)
    a, b, c = (library / f"{n}.safetensors" for n in ("star-shape", "wavy-bg", "pixel-style"))
    held = residency.acquire([a])
    residency.release(residency.acquire([b]))
    residency.release(residency.acquire([c]))  # over 2: b is the least recently used free one
    assert set(serving.runtime.adapters) == {"star-shape", "pixel-style"} and residency.evictions == 1
    residency.release(held)
    residency.acquire([b])
    assert "star-shape" not in serving.runtime.adapters and cache.hits == 1  # b came back from the cache
    with torch.no_grad():
        assert residency.bytes > 0


def test_cancelling_a_running_request_leaves_the_batch_running(world):
    serving, _, library = world
    serving.unload_all()
    residency = Residency(serving, max_bytes=64 << 20)
    batcher = Batcher(serving, residency, max_batch=4)
    try:
        long = batcher.submit(RenderSpec("a star", loras=[(library / "star-shape.safetensors", 1.0)], seed=1, steps=8))
        other = batcher.submit(
            RenderSpec("a cross", loras=[(library / "cross-shape.safetensors", 1.0)], seed=2, steps=4)
        )
        while not any(e["event"] == "step" for e in long.events_after(0, 5.0)):
            pass
        batcher.cancel(long.id)
        assert other.wait(60) and long.wait(60)
        assert other.status == "done" and other.png and long.status == "cancelled" and long.png is None
        assert long.error.startswith("cancelled at step") and long.http_status == 499
        assert not residency._pins  # the cancelled request's adapters are free to evict again
    finally:
        batcher.close()


def test_a_lora_that_does_not_fit_fails_alone(world, sd15_pipe, make_lora):
    serving, _, library = world
    serving.unload_all()
    wrong = make_lora(sd15_pipe, "other-model")  # made for another (tiny) model: its layers do not fit
    batcher = Batcher(serving, Residency(serving, max_bytes=64 << 20), max_batch=4)
    try:
        good = batcher.submit(RenderSpec("a star", loras=[(library / "star-shape.safetensors", 1.0)], seed=1, steps=3))
        bad = batcher.submit(RenderSpec("a star", loras=[(wrong, 1.0)], seed=1, steps=3))
        assert good.wait(60) and bad.wait(60)
        assert good.status == "done" and bad.status == "failed" and bad.http_status == 422
        assert "other-model" in bad.error and "\n" not in bad.error
        assert "other-model" not in serving.runtime.adapters  # nothing of it stayed attached
    finally:
        batcher.close()


def test_strategies_take_their_row_groups_in_the_shared_batch(world):
    """Composite, conjunction, LoRAtorio, CMLoRA (which reuses predictions), switch and gated requests share
    denoiser passes with a merge request; each image equals its own solo render through ComposerPipeline."""
    serving, solo, library = world
    serving.unload_all()
    batcher = Batcher(serving, Residency(serving, max_bytes=64 << 20), max_batch=8)

    def lib(name):
        return library / f"{name}.safetensors"

    pair = [(lib("star-shape"), 1.0), (lib("purple-colour"), 0.8)]
    trio = [(lib("blinky-character"), 1.0), (lib("wavy-bg"), 0.9), (lib("orange-colour"), 0.7)]
    specs = [
        RenderSpec("a purple star", loras=pair, seed=21, steps=4, guidance=5.0),
        RenderSpec("a purple star", loras=pair, strategy="composite", seed=22, steps=4, guidance=5.0),
        RenderSpec("blinky, orange, wavy", loras=trio, strategy="conjunction", seed=23, steps=4, guidance=5.0),
        RenderSpec("blinky, orange, wavy", loras=trio, strategy="loratorio", seed=24, steps=4, guidance=5.0),
        RenderSpec("a purple star", loras=pair, strategy="cmlora", seed=25, steps=5, guidance=5.0),
        RenderSpec(
            "blinky, orange, wavy",
            loras=trio,
            strategy="switch",
            strategy_args={"every": 1},
            seed=26,
            steps=4,
            guidance=5.0,
        ),
        RenderSpec("a purple star", loras=pair, strategy="gated", seed=27, steps=3, guidance=5.0),
    ]
    try:
        jobs = [batcher.submit(s) for s in specs]
        for job in jobs:
            assert job.wait(300), job.summary()
        assert [j.status for j in jobs] == ["done"] * len(jobs), [j.error for j in jobs]
        assert all(j.batched_with >= 1 for j in jobs)  # none ran alone
        for job, spec in zip(jobs, specs):
            want = _solo(solo, spec)
            assert np.abs(job.array - want).max() < 1e-4, spec.strategy
            record = GenerationRecord.from_json(Image.open(io.BytesIO(job.png)).text[RECORD_KEY])
            assert record.strategy == spec.strategy
        merged = _solo(solo, dataclasses.replace(specs[1], strategy="merge"))
        assert np.abs(jobs[1].array - merged).max() > 1e-3  # composite is not merge: the plan really acted
    finally:
        batcher.close()


def test_strategies_with_derived_adapters_run_alone(world):
    serving, _, library = world
    batcher = Batcher(serving, Residency(serving, max_bytes=64 << 20))
    try:
        ties = RenderSpec("a star", loras=[(library / "star-shape.safetensors", 1.0)], strategy="ties", steps=2)
        assert not batcher._batchable(Job(ties))
        assert batcher._batchable(Job(dataclasses.replace(ties, strategy="composite")))
    finally:
        batcher.close()


def test_a_strategy_that_patches_this_denoiser_runs_alone(world):
    """gated measures a DiT's joint attention by patching it (a shared pass would mix requests) but leaves a UNet
    as it is: alone on FLUX.1, in the shared batch on a UNet; bad strategy arguments run alone (and fail there)."""
    from lora_composer import tiny_dit
    from lora_composer.pipeline import ComposerPipeline

    serving, _, library = world
    unet = Batcher(serving, Residency(serving, max_bytes=64 << 20))
    flux = ComposerPipeline(tiny_dit.build_tiny_flux_pipeline(seed=0))
    dit = Batcher(flux, Residency(flux, max_bytes=64 << 20))
    try:
        gated = RenderSpec("a star", loras=[(library / "star-shape.safetensors", 1.0)], strategy="gated", steps=2)
        assert unet._batchable(Job(gated)) and not dit._batchable(Job(gated))
        assert dit._batchable(Job(dataclasses.replace(gated, strategy="composite")))
        assert not unet._batchable(Job(dataclasses.replace(gated, strategy_args={"power": -1})))
    finally:
        unet.close()
        dit.close()


def test_sdxl_requests_share_batches_and_equal_their_solo_renders(sdxl_pipe, make_lora, tmp_path):
    """SDXL's added conditioning (pooled embeddings, size ids) rides along each request's rows: a merge and a
    composite request with different LoRAs and prompts, batched, equal their renders alone."""
    import copy

    from lora_composer.pipeline import ComposerPipeline

    a, b = make_lora(sdxl_pipe, "xl-a", seed=1), make_lora(sdxl_pipe, "xl-b", seed=2)
    solo = ComposerPipeline(copy.deepcopy(sdxl_pipe))
    serving = ComposerPipeline(sdxl_pipe)
    batcher = Batcher(serving, Residency(serving, max_bytes=64 << 20), max_batch=4)
    assert batcher.batching
    specs = [
        RenderSpec("a cat", loras=[(a, 1.0)], seed=31, steps=3, guidance=5.0, width=64, height=64),
        RenderSpec(
            "a dog",
            loras=[(a, 0.7), (b, 1.0)],
            strategy="composite",
            seed=32,
            steps=3,
            guidance=5.0,
            width=64,
            height=64,
        ),
        RenderSpec(
            "a bird", loras=[(b, 1.0)], negative_prompt="blurry", seed=33, steps=2, guidance=1.0, width=64, height=64
        ),
    ]
    try:
        jobs = [batcher.submit(s) for s in specs]
        for job in jobs:
            assert job.wait(120), job.summary()
        assert [j.status for j in jobs] == ["done"] * 3, [j.error for j in jobs]
        assert all(j.batched_with >= 1 for j in jobs)
        for job, spec in zip(jobs, specs):
            want = solo(
                spec.prompt,
                negative_prompt=spec.negative_prompt or None,
                loras=[(str(p), w) for p, w in spec.loras],
                strategy=spec.strategy,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                seed=spec.seed,
                height=64,
                width=64,
                output_type="np",
                progress=False,
            )[0]
            assert np.abs(job.array - want).max() < 1e-4, spec.prompt
        base = solo(
            "a cat",
            num_inference_steps=3,
            guidance_scale=5.0,
            seed=31,
            height=64,
            width=64,
            output_type="np",
            progress=False,
        )[0]
        assert np.abs(jobs[0].array - base).max() > 1e-3  # the LoRA acted
    finally:
        batcher.close()


def _dit_pipe(family: str):
    from lora_composer import tiny_dit

    if family == "kontext":  # the same weights as a FluxKontextPipeline (text to image: no input image)
        from diffusers import FluxKontextPipeline

        pipe = FluxKontextPipeline(**tiny_dit.build_tiny_flux_pipeline(seed=0).components)
        pipe.default_sample_size = 16
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return tiny_dit.build_tiny_flux_pipeline(seed=0) if family == "flux" else tiny_dit.build_tiny_sd3_pipeline(seed=0)


@pytest.mark.parametrize("family", ["flux", "kontext", "sd3"])
def test_dit_requests_share_batches_and_equal_their_solo_renders(family, tmp_path):
    """FLUX.1 (guidance as an input, packed latents, shared position ids), Kontext without an input image and SD3
    (joint attention, classifier-free guidance): requests with different LoRA sets, strategies, prompts and
    guidance share transformer passes, and each equals its render alone through the pipeline's own loop."""
    import copy

    from lora_composer import tiny_dit
    from lora_composer.pipeline import ComposerPipeline

    pipe = _dit_pipe(family)
    text = ("text_encoder", "text_encoder_2") if family == "sd3" else ("text_encoder",)  # as diffusers saves them
    a, b = (
        tiny_dit.save_dit_diffusers_lora(
            pipe,
            tiny_dit.random_dit_lora_layers(pipe, seed=i, text_encoders=text),
            tmp_path / f"{name}.safetensors",
            rank=4,
        )
        for i, name in ((1, "a"), (2, "b"))
    )
    solo = ComposerPipeline(copy.deepcopy(pipe))
    serving = ComposerPipeline(pipe)
    batcher = Batcher(serving, Residency(serving, max_bytes=64 << 20), max_batch=4)
    assert batcher.batching
    size = dict(width=16, height=16)
    specs = [
        RenderSpec("a cat", loras=[(a, 1.0)], seed=41, steps=3, guidance=3.5, **size),
        RenderSpec(
            "a dog",
            loras=[(a, 0.7), (b, 1.0)],
            strategy="composite",
            seed=42,
            steps=3,
            guidance=5.0,
            negative_prompt="blurry",
            **size,
        ),
        RenderSpec("a bird", loras=[(b, 1.2)], seed=43, steps=2, guidance=1.0, **size),
    ]
    try:
        jobs = [batcher.submit(s) for s in specs]
        for job in jobs:
            assert job.wait(120), job.summary()
        assert [j.status for j in jobs] == ["done"] * 3, [j.error for j in jobs]
        assert all(j.batched_with >= 1 for j in jobs)  # none ran alone
        for job, spec in zip(jobs, specs):
            want = solo(
                spec.prompt,
                negative_prompt=spec.negative_prompt or None,
                loras=[(str(p), w) for p, w in spec.loras],
                strategy=spec.strategy,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                seed=spec.seed,
                output_type="np",
                progress=False,
                **size,
            )[0]
            assert job.array.shape == want.shape and np.abs(job.array - want).max() < 1e-4, (family, spec.prompt)
        base = solo(
            "a cat", num_inference_steps=3, guidance_scale=3.5, seed=41, output_type="np", progress=False, **size
        )[0]
        assert np.abs(jobs[0].array - base).max() > 1e-3  # the LoRA acted
    finally:
        batcher.close()


def test_an_internal_failure_fails_its_request_and_is_logged(world, monkeypatch, caplog):
    """A fault inside the server fails that request with a one-line 500 and goes to the library's logger with
    its traceback (``compose serve --log-level``), never to a bare print."""
    import logging

    serving, _, library = world
    batcher = Batcher(serving, Residency(serving, max_bytes=64 << 20))

    def broken(*args, **kwargs):
        raise RuntimeError("decoder on fire\nsecond line")

    monkeypatch.setattr(batcher.render, "decode", broken)
    try:
        with caplog.at_level(logging.ERROR, logger="lora_composer"):
            job = batcher.submit(RenderSpec("a star", loras=[(library / "star-shape.safetensors", 1.0)], steps=2))
            assert job.wait(120), job.summary()
        assert job.status == "failed" and job.http_status == 500 and job.error == "internal error: decoder on fire"
        records = [r for r in caplog.records if r.name == "lora_composer.serving.batcher"]
        assert records and records[0].levelno == logging.ERROR and job.id in records[0].getMessage()
        assert records[0].exc_info is not None and "decoder on fire" in str(records[0].exc_info[1])
    finally:
        batcher.close()
