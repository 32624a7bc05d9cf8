"""The job store that outlives ``compose serve``: SQLite (a file) and Redis (through fakeredis, which speaks the
same commands, and a real ``redis-server`` where one is installed), then a server killed mid-job and started again on the same store: every accepted job is
answered, the unfinished ones run again with their stored seed, each image equal to its solo render."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from lora_composer.serving.job_store import (
    JobRecord,
    JobStoreError,
    Recorder,
    RedisJobStore,
    SQLiteJobStore,
    open_store,
    resolve_url,
)
from lora_composer.serving.jobs import Job, RenderSpec

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # bytes a text column would mangle


@pytest.fixture(params=["sqlite", "fakeredis", "redis-server"])
def reopen(request, tmp_path):
    """``reopen()`` -> a store on the same data each time it is called (a new connection, as after a restart)."""
    opened, server = [], None
    if request.param == "sqlite":

        def make(**kw):
            opened.append(SQLiteJobStore(tmp_path / "jobs.sqlite", **kw))
            return opened[-1]
    elif request.param == "fakeredis":
        fakeredis = pytest.importorskip("fakeredis")
        fake = fakeredis.FakeServer()

        def make(**kw):
            opened.append(RedisJobStore("redis://fake", client=fakeredis.FakeRedis(server=fake), **kw))
            return opened[-1]
    else:
        pytest.importorskip("redis")
        if shutil.which("redis-server") is None:
            pytest.skip("no redis-server on this machine")
        url = f"redis://127.0.0.1:{_free_port()}/0"
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                url.rsplit(":", 1)[1].split("/")[0],
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                RedisJobStore(url).close()
                break
            except JobStoreError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.1)

        def make(**kw):
            opened.append(RedisJobStore(url, **kw))
            return opened[-1]

    yield make
    for store in opened:
        store.close()
    if server is not None:
        server.terminate()
        server.wait(10)


def _record(i: int, **kw) -> JobRecord:
    return JobRecord(
        id=f"job-{i}",
        request={"prompt": f"p{i}", "seed": 1000 + i, "loras": [{"name": "a"}]},
        steps=10,
        created=1000.0 + i,
        **kw,
    )


def test_put_get_update_and_unfinished(reopen):
    store = reopen()
    assert store.get("job-0") is None and store.unfinished() == []
    for i in range(4):
        store.put(_record(i))
    got = store.get("job-2")
    assert got.request == {"prompt": "p2", "seed": 1002, "loras": [{"name": "a"}]} and got.status == "queued"
    assert store.update("job-1", status="running", step=3, replica="r1")
    assert store.update("job-2", status="done", step=10, png=PNG)
    assert store.update("job-3", status="failed", error="loras[0].name: gone", http_status=422)
    assert not store.update("job-9", status="done")  # no such job
    with pytest.raises(KeyError, match="colour"):
        store.update("job-1", colour="red")
    assert [r.id for r in store.unfinished()] == ["job-0", "job-1"]  # oldest first, finished ones left out
    running = store.get("job-1")
    assert (running.status, running.step, running.replica) == ("running", 3, "r1")
    done = store.get("job-2")
    assert done.png == PNG and done.summary() == {
        "id": "job-2",
        "status": "done",
        "steps": 10,
        "step": 10,
        "result": "/v1/jobs/job-2/result",
    }
    failed = store.get("job-3")
    assert (failed.error, failed.http_status, failed.png) == ("loras[0].name: gone", 422, None)
    assert store.update("job-3", status="queued", error=None)  # None clears a field
    assert store.get("job-3").error is None and [r.id for r in store.unfinished()] == ["job-0", "job-1", "job-3"]


def test_survives_reopening(reopen):
    store = reopen()
    store.put(_record(0))
    store.put(_record(1))
    store.update("job-1", status="done", png=PNG)
    store.close()
    again = reopen()
    assert [r.id for r in again.unfinished()] == ["job-0"]
    assert again.get("job-1").png == PNG and again.get("job-0").request["seed"] == 1000


def test_concurrent_writers_from_two_threads(reopen):
    store = reopen()
    errors = []

    def writer(first: int):
        try:
            for i in range(first, first + 60):
                store.put(_record(i))
                store.update(f"job-{i}", status="running", step=1)
                if i % 2:
                    store.update(f"job-{i}", status="done", png=PNG + str(i).encode())
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(first,)) for first in (0, 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    unfinished = {r.id for r in store.unfinished()}
    assert unfinished == {f"job-{i}" for first in (0, 1000) for i in range(first, first + 60) if not i % 2}
    assert all(store.get(f"job-{i}").png == PNG + str(i).encode() for i in (1, 59, 1001, 1059))


def test_only_the_most_recent_finished_jobs_are_kept(reopen):
    store = reopen(keep=2)
    for i in range(5):
        store.put(_record(i))
    for i in range(4):
        store.update(f"job-{i}", status="done", png=PNG, updated=2000.0 + i)
    assert [i for i in range(5) if store.get(f"job-{i}") is not None] == [2, 3, 4]  # unfinished job-4 stays


def test_the_sqlite_file_holds_json_and_png_bytes_not_pickles(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite")
    store.put(_record(0))
    store.update("job-0", status="done", png=PNG)
    store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite") as db:
        request, png = db.execute("SELECT request, png FROM jobs").fetchone()
    assert json.loads(request)["seed"] == 1000 and bytes(png) == PNG


def test_recorder_follows_a_job_and_a_shutdown_leaves_it_unfinished(tmp_path, monkeypatch):
    monkeypatch.setattr(Recorder, "STEP_EVERY_S", 0.0)  # every step written (a server writes them at most 2/s)
    store = SQLiteJobStore(tmp_path / "jobs.sqlite")
    a, b, c = (Job(RenderSpec(prompt="x", steps=4)) for _ in range(3))
    for job in (a, b, c):
        store.put(JobRecord(id=job.id, request={"prompt": "x", "seed": 1}, steps=4))
        Recorder(store, job)
    a.start()
    a.emit("step", step=1, steps=4)
    assert (store.get(a.id).status, store.get(a.id).step) == ("running", 1)
    a.finish("done", png=PNG)
    b.finish("cancelled", error="cancelled", http_status=499)  # its client's DELETE: final
    c.start()
    c.finish("cancelled", error="the server shut down", http_status=503)  # a shutdown: run it again next time
    assert (store.get(a.id).status, store.get(a.id).png) == ("done", PNG)
    assert store.get(b.id).status == "cancelled" and store.get(b.id).http_status == 499
    assert [r.id for r in store.unfinished()] == [c.id] and store.get(c.id).status == "running"


def test_bad_urls_and_a_missing_redis_client_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(JobStoreError, match=r"^jobs-url ftp://x: not a store"):
        resolve_url("ftp://x")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(JobStoreError, match="jobs-url .*a-file/jobs.sqlite: cannot open the job store"):
        open_store(str(tmp_path / "a-file" / "jobs.sqlite"))
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(JobStoreError) as info:
        open_store("redis://localhost:6379/0")
    assert "pip install 'lora-composer[redis]'" in str(info.value) and "\n" not in str(info.value)
    assert resolve_url("none") is None and resolve_url(f"sqlite://{tmp_path}/j.db") == f"{tmp_path}/j.db"
    assert resolve_url("", port=8123).endswith("serve/jobs-8123.sqlite")


def test_serve_command_says_a_bad_store_in_one_line_before_loading(tmp_path, monkeypatch, capsys):
    from lora_composer.frontends.cli import main

    monkeypatch.setitem(sys.modules, "redis", None)
    (tmp_path / "a-file").write_text("x")
    for url, says in [
        ("ftp://x", "jobs-url ftp://x: not a store"),
        ("redis://127.0.0.1:6379/0", "pip install 'lora-composer[redis]'"),
        (str(tmp_path / "a-file" / "j.sqlite"), "cannot open the job store"),
    ]:
        started = time.monotonic()
        assert main(["serve", "--jobs-url", url]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("compose serve: error: jobs-url") and says in err and len(err.splitlines()) == 1, err
        assert time.monotonic() - started < 20  # refused before any model is loaded


# -- a real restart: `compose serve` killed (SIGKILL) mid-job, then started again on the same store -----------

STEPS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, jobs: str, home) -> subprocess.Popen:
    env = {**os.environ, "LORA_COMPOSER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("LORA_COMPOSER_LIBRARY", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lora_composer",
            "serve",
            "--port",
            str(port),
            "--jobs-url",
            jobs,
            "--max-steps",
            str(STEPS),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait_up(client: httpx.Client, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
        try:
            if client.get("/v1/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("compose serve did not start")


def _solo(solo, body: dict) -> np.ndarray:
    from lora_composer.library import list_loras

    files = {p.stem: p for p in list_loras(solo.library)}
    out = solo(
        body["prompt"],
        loras=[(str(files[item["name"]]), item["weight"]) for item in body["loras"]],
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        seed=body["seed"],
        height=64,
        width=64,
        output_type="np",
        progress=False,
    )
    return np.round(out[0] * 255)


def test_a_killed_server_answers_every_job_after_a_restart(home, tmp_path):
    from tests.serve_world import pipelines

    jobs = str(tmp_path / "jobs.sqlite")
    port = _free_port()
    bodies = [
        {
            "prompt": "a purple star",
            "loras": [{"name": "star-shape", "weight": 1.0}, {"name": "purple-colour", "weight": 0.8}],
            "seed": 11,
        },
        {"prompt": "blinky on a wavy background", "loras": [{"name": "blinky-character", "weight": 1.0}]},
        {"prompt": "a purple square", "loras": [{"name": "purple-colour", "weight": 1.0}], "seed": 13},
    ]
    first = _start(port, jobs, home)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            _wait_up(client, first)
            ids = []
            for body in bodies:
                r = client.post("/v1/jobs", json={**body, "steps": STEPS, "guidance": 5.0, "width": 64, "height": 64})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            deadline = time.monotonic() + 120
            while client.get(f"/v1/jobs/{ids[0]}").json()["step"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.killpg(first.pid, signal.SIGKILL)  # mid-job: nothing is drained, nothing more written
            first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    with sqlite3.connect(jobs) as db:
        stored = {
            job_id: (status, json.loads(request)["seed"])
            for job_id, status, request in db.execute("SELECT id, status, request FROM jobs")
        }
    assert set(stored) == set(ids)
    unfinished = [j for j in ids if stored[j][0] in ("queued", "running")]
    assert unfinished, stored  # the kill came before every job was done
    assert stored[ids[1]][1] is not None  # the job sent without a seed was stored with the one it was given

    second = _start(port, jobs, home)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            _wait_up(client, second)
            states = {}
            deadline = time.monotonic() + 240
            while len(states) < len(ids) and time.monotonic() < deadline:
                for job_id in ids:
                    state = client.get(f"/v1/jobs/{job_id}")
                    assert state.status_code == 200, state.text  # known after the restart, never a 404
                    if state.json()["status"] in ("done", "failed", "cancelled"):
                        states[job_id] = state.json()
                time.sleep(0.2)
            assert all(states.get(j, {}).get("status") == "done" for j in ids), states
            assert all(states[j]["id"] == j for j in ids)
            images = {j: client.get(f"/v1/jobs/{j}/result") for j in ids}
            for job_id in ids:  # the story under the id the client knows, whether run again or read back
                events = [
                    json.loads(line[6:])
                    for line in client.get(f"/v1/jobs/{job_id}/events").text.splitlines()
                    if line.startswith("data: ")
                ]
                assert events[-1]["event"] == "done" and {e["job"] for e in events} == {job_id}, events
            metrics = client.get("/metrics").text
    finally:
        second.send_signal(signal.SIGINT)
        try:
            second.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
    resumed = [line for line in metrics.splitlines() if line.startswith("lora_composer_jobs_resumed_total")]
    assert resumed and float(resumed[0].split()[1]) == len(unfinished)
    solo = pipelines()[1]
    for job_id, body in zip(ids, bodies):
        assert images[job_id].status_code == 200 and images[job_id].headers["x-job-id"] == job_id
        image = np.asarray(Image.open(io.BytesIO(images[job_id].content)).convert("RGB"), dtype=np.float64)
        assert np.abs(image - _solo(solo, {**body, "seed": stored[job_id][1]})).max() <= 1, job_id
