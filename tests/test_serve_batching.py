"""Step-level batching on the mini world (fp32): requests with different LoRA sets share denoiser passes, one
joins mid-way, and each image equals its solo render through ComposerPipeline (an independent pipeline)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lora_composer.pnginfo import RECORD_KEY, GenerationRecord
from lora_composer.serving.adapter_cache import AdapterCache
from lora_composer.serving.batcher import Batcher
from lora_composer.serving.jobs import RenderSpec
from lora_composer.serving.residency import Residency


@pytest.fixture(scope="module")
def world(home):
    from tests.serve_world import pipelines

    return pipelines()


def _solo(solo, spec: RenderSpec) -> np.ndarray:
    out = solo(spec.prompt, loras=[(str(p), w) for p, w in spec.loras], num_inference_steps=spec.steps,
               guidance_scale=spec.guidance, seed=spec.seed, height=spec.height, width=spec.width,
               output_type="np", progress=False)
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
        RenderSpec("a purple star on a striped background", loras=[(lib("star-shape"), 1.0), (lib("purple-colour"), 0.8)],
                   seed=11, steps=4, guidance=5.0),
        RenderSpec("blinky on a wavy background", loras=[(lib("blinky-character"), 1.0), (lib("wavy-bg"), 1.0)],
                   seed=12, steps=4, guidance=5.0),
        RenderSpec("an orange cross", loras=[(lib("orange-colour"), 1.0), (lib("cross-shape"), 0.9)], seed=13, steps=3,
                   guidance=5.0),
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
        assert batcher.metrics.batch_requests.n > 0 and max(
            edge for edge, c in zip(batcher.metrics.batch_requests.buckets, batcher.metrics.batch_requests.counts)
            if c == batcher.metrics.batch_requests.n) >= 3
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
        other = batcher.submit(RenderSpec("a cross", loras=[(library / "cross-shape.safetensors", 1.0)], seed=2, steps=4))
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
