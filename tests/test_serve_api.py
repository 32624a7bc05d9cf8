"""``compose serve``'s HTTP API in process (FastAPI's TestClient) on the mini world: the PNG and its record,
jobs with server-sent events, refusals naming the field, the bearer token, 429 with Retry-After, cancellation,
a drain at shutdown that answers every accepted request, metrics, the catalog, the CLI's binding rules."""

from __future__ import annotations

import io
import json
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lora_composer.pnginfo import RECORD_KEY, GenerationRecord
from lora_composer.serving.app import Server, ServerConfig, create_app
from lora_composer.serving.requests import Limits

SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def world(home):
    from tests.serve_world import pipelines

    return pipelines()


def _server(world, **kw) -> Server:
    composer = world[0]
    composer.unload_all()
    kw.setdefault("limits", Limits(max_steps=8, max_pixels=128 * 128, max_loras=3))
    return Server(ServerConfig(**kw), composer=composer)


class _Hold:
    """Keeps the worker thread busy (as a long render would) until released."""

    def __init__(self, server):
        self.release = threading.Event()
        started = threading.Event()

        def hold():
            started.set()
            self.release.wait(30)

        self.thread = threading.Thread(target=lambda: server.batcher.call(hold, timeout=60))
        self.thread.start()
        started.wait(10)

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(30)

    def __enter__(self):
        return self


def test_generate_jobs_events_and_refusals(world):
    server = _server(world)
    with TestClient(create_app(server)) as client:
        body = {
            "prompt": "a purple star <lora:star-shape:0.9>",
            "loras": [{"name": "purple-colour", "weight": 1}],
            "seed": 5,
            **SMALL,
        }
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        first = r.content
        image = Image.open(io.BytesIO(r.content))
        record = GenerationRecord.from_json(image.text[RECORD_KEY])
        assert image.size == (64, 64) and record.seed == 5 and record.steps == 2 and record.prompt == "a purple star"
        assert {lo["name"]: lo["unet_weight"] for lo in record.loras} == {"purple-colour": 1.0, "star-shape": 0.9}
        assert "Lora hashes" in image.text["parameters"]

        auto = client.post("/v1/generate", json={"prompt": "blinky on a wavy background", "loras": "auto", **SMALL})
        picked = [
            lo["name"] for lo in GenerationRecord.from_json(Image.open(io.BytesIO(auto.content)).text[RECORD_KEY]).loras
        ]
        assert auto.status_code == 200 and {"blinky-character", "wavy-bg"} <= set(picked), picked

        r = client.post("/v1/jobs", json={**body, "seed": 6})
        assert r.status_code == 202
        job = r.json()["id"]
        with client.stream("GET", f"/v1/jobs/{job}/events") as events:
            lines = [line for line in events.iter_lines() if line.startswith("data: ")]
        kinds = [json.loads(line[6:])["event"] for line in lines]
        assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("step") == 2
        assert client.get(f"/v1/jobs/{job}").json()["status"] == "done"
        png = client.get(f"/v1/jobs/{job}/result")
        assert (
            png.status_code == 200
            and GenerationRecord.from_json(Image.open(io.BytesIO(png.content)).text[RECORD_KEY]).seed == 6
        )

        refusals = {
            "loras[0].name": {"loras": [{"name": "../../etc/passwd"}]},
            "loras[0].name ": {"loras": [{"name": "/etc/hostname"}]},
            "prompt": {"prompt": "x <lora:no-such-lora:1>"},
            "steps": {"steps": 9},
            "width": {"width": 60},
            "loras": {"loras": [{"name": n} for n in ("star-shape", "wavy-bg", "pixel-style", "cross-shape")]},
            "loras[0].weight": {"loras": [{"name": "star-shape", "weight": "heavy"}]},
            "sampler_typo": {"sampler_typo": 1},
            "strategy": {"strategy": "nope"},
            "loras ": {"strategy": "regional", "prompt": "a star BREAK a cross", "loras": "auto"},
            "strategy_args": {"strategy": "switch", "strategy_args": {"every": -3, "nonsense": 1}},
            "scheduler": {"scheduler": "NoSuchScheduler"},
        }
        for field, change in refusals.items():
            r = client.post("/v1/generate", json={**body, **change})
            message = r.json()["error"]
            assert r.status_code == 422 and message.startswith(field.strip()) and "\n" not in message, (field, message)
        assert client.get("/v1/jobs/nope").status_code == 404
        # the refusals disturbed nothing: the next request renders the same image as the first
        again = client.post("/v1/generate", json=body)
        pixels = lambda png: (
            Image.open(io.BytesIO(png)).convert("RGB").tobytes()
        )  # the pixels, not the record (its time)
        assert again.status_code == 200 and pixels(again.content) == pixels(first)

        metrics = client.get("/metrics").text
        for name in (
            "lora_composer_queue_depth",
            "lora_composer_batch_requests_bucket",
            "lora_composer_step_seconds_sum",
            "lora_composer_adapter_cache_hits_total",
            'lora_composer_rejected_total{code="422"}',
        ):
            assert name in metrics, name
        attached = server.residency.attached()  # each file parsed once and kept attached
        assert server.cache.misses == len(attached) == 4 and {"purple-colour", "star-shape"} <= set(attached)
        assert client.get("/v1/health").json()["status"] == "ok"
        names = [x["name"] for x in client.get("/v1/loras").json()["loras"]]
        assert "star-shape.safetensors" in names
        ranked = client.get("/v1/loras", params={"q": "blinky"}).json()["loras"]
        assert ranked and ranked[0]["name"] == "blinky-character.safetensors"
        assert "/v1/generate" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200


def test_token_queue_limit_cancel_and_drain(world):
    server = _server(world, token="s3cret", max_queue=2)
    auth = {"Authorization": "Bearer s3cret"}
    body = {"prompt": "a red circle", "loras": [{"name": "wavy-bg"}], **SMALL}
    with TestClient(create_app(server)) as client:
        assert client.post("/v1/jobs", json=body).status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/health").status_code == 200  # health stays public
        with _Hold(server):
            a = client.post("/v1/jobs", json={**body, "seed": 1}, headers=auth).json()["id"]
            b = client.post("/v1/jobs", json={**body, "seed": 2}, headers=auth).json()["id"]
            full = client.post("/v1/jobs", json={**body, "seed": 3}, headers=auth)
            assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
            assert full.json()["error"].startswith("the queue is full")
            assert client.delete(f"/v1/jobs/{b}", headers=auth).json()["status"] == "cancelled"
            assert client.get(f"/v1/jobs/{b}/result", headers=auth).status_code == 499
        r = client.get(f"/v1/jobs/{a}/result", headers=auth)
        while r.status_code == 409:
            r = client.get(f"/v1/jobs/{a}/result", headers=auth)
        assert r.status_code == 200
        # shutdown: accepted requests are finished, new ones refused
        with _Hold(server):
            c = client.post("/v1/jobs", json={**body, "seed": 4}, headers=auth).json()["id"]
            closing = threading.Thread(target=server.batcher.close)
            closing.start()
            while not server.batcher._closing:
                pass
            assert client.post("/v1/jobs", json=body, headers=auth).status_code == 503
        closing.join(60)
        assert server.batcher.jobs[c].status == "done"


def test_serve_command_refuses_an_open_bind_without_token(capsys, monkeypatch):
    from lora_composer.frontends.cli import main
    from lora_composer.frontends.serve import is_loopback

    monkeypatch.delenv("LORA_COMPOSER_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "token" in err and len(err.strip().splitlines()) == 1
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--ray", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--host", "0.0.0.0"]) == 2  # the token rule holds on Ray Serve too


def test_separate_text_and_denoiser_weights_are_served(world):
    """``<lora:name:te:unet>`` and ``te_weight`` reach the text encoder and the denoiser apart, in the batch loop,
    as ComposerPipeline renders them alone."""
    import numpy as np

    server = _server(world)
    solo, library = world[1], world[2]
    body = {
        "prompt": "a purple star <lora:star-shape:0.2:1>",
        "seed": 7,
        "guidance": 5.0,
        "loras": [{"name": "purple-colour", "weight": 1.0, "te_weight": 0.4}],
        **SMALL,
    }
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/generate", json=body)
        same = client.post(
            "/v1/generate",
            json={
                **body,
                "prompt": "a purple star <lora:star-shape:1>",
                "loras": [{"name": "purple-colour", "weight": 1.0}],
            },
        )
    assert r.status_code == 200 and same.status_code == 200, r.text
    record = GenerationRecord.from_json(Image.open(io.BytesIO(r.content)).text[RECORD_KEY])
    assert {lo["name"]: (lo["te_weight"], lo["unet_weight"]) for lo in record.loras} == {
        "purple-colour": (0.4, 1.0),
        "star-shape": (0.2, 1.0),
    }
    want = solo(
        "a purple star",
        loras=[
            (str(library / "purple-colour.safetensors"), 0.4, 1.0),
            (str(library / "star-shape.safetensors"), 0.2, 1.0),
        ],
        num_inference_steps=2,
        guidance_scale=5.0,
        seed=7,
        height=64,
        width=64,
        output_type="np",
        progress=False,
    )[0]
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=np.float64)
    assert np.abs(got - np.round(want * 255)).max() <= 1
    other = np.asarray(Image.open(io.BytesIO(same.content)).convert("RGB"), dtype=np.float64)
    assert np.abs(got - other).max() > 2  # the text-encoder weights changed the picture


def test_regional_requests_keep_each_tag_in_its_region(world):
    """A regional prompt's tags act in their regions (the server resolves them to library files in place); the
    render is the pipeline's own, and a region naming a file outside the library is refused."""
    server = _server(world)
    prompt = "a purple circle <lora:purple-colour:0.9> BREAK blinky, a red square <lora:blinky-character>"
    body = {
        "prompt": prompt,
        "loras": [{"name": "wavy-bg"}],
        "strategy": "regional",
        "seed": 3,
        "steps": 2,
        "width": 128,
        "height": 64,
    }
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        served = Image.open(io.BytesIO(r.content))
        record = GenerationRecord.from_json(served.text[RECORD_KEY])
        assert [g["loras"] for g in record.strategy_args["regions"]] == [
            {"wavy-bg": 1.0, "purple-colour": 0.9},
            {"wavy-bg": 1.0, "blinky-character": 1.0},
        ]
        bad = client.post("/v1/generate", json={**body, "prompt": "a BREAK b <lora:../../etc/passwd>"})
        assert bad.status_code == 422 and bad.json()["error"].startswith("prompt")
    composer = world[0]
    alone = composer(
        prompt,
        loras=[("wavy-bg", 1.0)],
        strategy="regional",
        seed=3,
        num_inference_steps=2,
        width=128,
        height=64,
        progress=False,
    )[0]
    assert served.convert("RGB").tobytes() == alone.convert("RGB").tobytes()
