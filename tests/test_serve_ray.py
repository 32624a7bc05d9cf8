"""``compose serve --ray`` on a local Ray cluster: two model replicas behind the gateway. Requests with the same
LoRA set land on the replica that already holds it (each set loaded once), every image equals its solo render,
killing a replica under load loses no accepted request, and neither does killing the gateway: its successor
answers every job from the job store and runs the unfinished ones again with their stored seeds."""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve


STEPS = 3
SETS = {  # LoRA set name -> (prompt, loras)
    "star": ("a purple star on a striped background", [("star-shape", 1.0), ("purple-colour", 0.8)]),
    "blinky": ("blinky on a wavy background", [("blinky-character", 1.0), ("wavy-bg", 0.9)]),
    "purple": ("a purple square", [("purple-colour", 1.0)]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(home):
    from lora_composer.serving.app import ServerConfig
    from lora_composer.serving.ray_serve import RayOptions, build_app, resolved
    from lora_composer.serving.requests import Limits
    from tests.serve_world import pipelines

    _, solo, library = pipelines()
    config = resolved(
        ServerConfig(
            library=str(library),
            limits=Limits(default_steps=STEPS),
            max_batch=4,
            jobs_url=str(home / "serve-jobs.sqlite"),
        )
    )
    port = _free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "LORA_COMPOSER_HOME": str(home)}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config, RayOptions(replicas=2, cpus_per_replica=1)), name="lc-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}", solo, config.jobs_url
    finally:
        serve.shutdown()
        ray.shutdown()


def _body(name: str, seed: int) -> dict:
    prompt, loras = SETS[name]
    return {
        "prompt": prompt,
        "loras": [{"name": n, "weight": w} for n, w in loras],
        "seed": seed,
        "steps": STEPS,
        "guidance": 5.0,
    }


def _solo(solo, body: dict) -> np.ndarray:
    from lora_composer.library import list_loras

    files = {p.stem: p for p in list_loras(solo.library)}
    out = solo(
        body["prompt"],
        loras=[(str(files[item["name"]]), item["weight"]) for item in body["loras"]],
        num_inference_steps=body["steps"],
        guidance_scale=body["guidance"],
        seed=body["seed"],
        height=64,
        width=64,
        output_type="np",
        progress=False,
    )
    return np.round(out[0] * 255)


def _metrics(text: str) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.float64)


def test_same_lora_set_same_replica_each_set_loaded_once(cluster):
    url, solo, _ = cluster
    order = ["star", "blinky", "purple"] * 3
    seen: dict[str, set] = {}
    states = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for i, name in enumerate(order):
            body = _body(name, seed=100 + i)
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            seen.setdefault(name, set()).add(r.headers["x-replica"])
            states.append(r.headers["x-lora-set"])
            if i < 3:  # one image per set against an independent solo render
                assert np.abs(_png(r.content) - _solo(solo, body)).max() <= 1
        bad = client.post("/v1/generate", json={"prompt": "x", "loras": [{"name": "../etc/passwd"}]})
        metrics = client.get("/metrics").text
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert len(set().union(*seen.values())) == 2  # both replicas took sets
    hit_rate = states.count("resident") / len(states)
    assert states.count("loaded") == 3 and hit_rate == pytest.approx(6 / 9), states
    assert bad.status_code == 422 and "not in the library" in bad.json()["error"]
    assert _metrics(metrics)["lora_composer_lora_set_hits_total"] == 6


def test_killing_a_replica_under_load_loses_no_accepted_request(cluster):
    url, solo, _ = cluster
    bodies = [
        _body(name, seed=200 + i) for i, name in enumerate(["star", "blinky", "purple", "star", "blinky", "star"])
    ]
    with httpx.Client(base_url=url, timeout=300) as client:
        ids = []
        for body in bodies:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:  # a replica with a job it has accepted and not finished
            for job_id in ids:
                state = client.get(f"/v1/jobs/{job_id}").json()
                if state["replica"] and state["status"] in ("queued", "running"):
                    victim = state["replica"]
                    break
            time.sleep(0.05)
        assert victim is not None, "no job was seen on a replica"
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)  # X-Replica: the actor name
        results = {}

        def wait(job_id):
            while True:
                state = client.get(f"/v1/jobs/{job_id}").json()
                if state["status"] in ("done", "failed", "cancelled"):
                    results[job_id] = state
                    return
                time.sleep(0.2)

        threads = [threading.Thread(target=wait, args=(job_id,)) for job_id in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert all(results[j]["status"] == "done" for j in ids), results
        for job_id, body in zip(ids, bodies):
            png = client.get(f"/v1/jobs/{job_id}/result")
            assert png.status_code == 200
            assert np.abs(_png(png.content) - _solo(solo, body)).max() <= 1
        metrics = _metrics(client.get("/metrics").text)
    assert metrics["lora_composer_ray_retries_total"] >= 1  # the killed replica's requests were sent again


def test_a_gateway_restart_loses_no_job(cluster):
    """Kill the gateway's actor while it holds accepted jobs: Serve starts another, which answers every job id
    (none is a 404) and runs the unfinished ones again with their stored seeds."""
    url, solo, jobs_url = cluster
    bodies = [{**_body(name, seed=300 + i), "steps": 10} for i, name in enumerate(["star", "blinky", "purple"])]
    del bodies[1]["seed"]  # the gateway fixes it and stores it
    with httpx.Client(base_url=url, timeout=60) as client:
        ids = []
        for body in bodies:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        gateway = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "#Gateway#" in a["name"])
        ray.kill(ray.get_actor(gateway["name"], namespace=gateway["namespace"]), no_restart=False)
        with sqlite3.connect(jobs_url) as db:
            stored = {
                job_id: (status, json.loads(request)["seed"])
                for job_id, status, request in db.execute(
                    f"SELECT id, status, request FROM jobs WHERE id IN ({','.join('?' * len(ids))})", ids
                )
            }
        assert set(stored) == set(ids) and stored[ids[1]][1] is not None
        unfinished = [j for j in ids if stored[j][0] in ("queued", "running")]
        assert unfinished, stored  # the gateway died with work in hand
        killed, back = time.monotonic(), None
        states: dict = {}
        deadline = time.monotonic() + 240
        while len(states) < len(ids) and time.monotonic() < deadline:
            for job_id in ids:
                try:
                    r = client.get(f"/v1/jobs/{job_id}")
                except httpx.TransportError:
                    continue  # the proxy while no gateway is up
                assert r.status_code != 404, r.text  # a job forgotten
                if r.status_code == 200 and back is None:
                    back = time.monotonic() - killed  # seconds without a gateway
                if r.status_code == 200 and r.json()["status"] in ("done", "failed", "cancelled"):
                    states[job_id] = r.json()
            time.sleep(0.3)
        assert all(states.get(j, {}).get("status") == "done" for j in ids), states
        for job_id, body in zip(ids, bodies):
            png = client.get(f"/v1/jobs/{job_id}/result")
            assert png.status_code == 200
            assert np.abs(_png(png.content) - _solo(solo, {**body, "seed": stored[job_id][1]})).max() <= 1
        metrics = _metrics(client.get("/metrics").text)
    assert metrics["lora_composer_jobs_resumed_total"] == len(unfinished)
    print(f"gateway answering again {back:.1f} s after the kill")
