"""A small load test on loopback (uvicorn on 127.0.0.1): 12 requests from 3 concurrent clients, random LoRA sets
of the mini world's library, some malformed. Valid answers equal their solo renders, malformed ones get a 4xx
naming the field, and the server still answers health checks (``bench/serve_load.py`` is the full size)."""

from __future__ import annotations

import pytest

from bench import serve_load


@pytest.fixture(scope="module")
def world(home):
    from tests.serve_world import pipelines

    return pipelines()


def test_small_load_on_loopback(world):
    from lora_composer.library import list_loras

    composer, solo, library = world
    names = [p.stem for p in list_loras(library)]
    requests = serve_load.make_requests(names, 12, malformed=0.25, steps=2, seed=3)
    assert 1 <= sum(kind is not None for _, kind in requests) < 12
    result = serve_load.measure(composer, solo, library, requests, clients=3, batching=True)
    assert result.healthy
    wrong = [(o.malformed, o.status, o.error) for o in result.outcomes if not o.ok]
    assert not wrong, wrong
    assert result.batch_mean > 1  # concurrent requests shared denoiser passes
    row = serve_load.row("batched", result)
    assert row["wrong"] == 0 and row["images/s"] > 0
