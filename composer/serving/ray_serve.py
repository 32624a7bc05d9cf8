"""``compose serve --ray --replicas N``: the same HTTP API on Ray Serve, one model replica per GPU.

    client -> Serve's proxy -> Gateway (FastAPI ingress: checks, job table, retries)
                            -> Renderer replicas (each a :class:`~lora_composer.serving.app.Server`: the model,
                               its adapter cache, residency and step-level batcher)

The gateway routes each request with Serve's model multiplexing, the request's LoRA set (the sha256 of its files'
contents, weights left out) standing for the model id: Serve prefers a replica that already holds the set, so a
set's files are parsed and attached once per replica, and requests with the same set keep batching together.
A replica that dies mid-request (a lost node, a killed process) costs no accepted request: the gateway sends it
again, with the seed it fixed before the first try, so the image is the one the first replica would have made.
"""

# no "from __future__ import annotations": Serve's ingress reads the route signatures at run time

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from lora_composer.errors import ComposerError, one_line
from lora_composer.serving.adapter_cache import file_sha256
from lora_composer.serving.app import Server, ServerConfig, error, event_stream, guard, record_stream, summary, woken_by
from lora_composer.serving.batcher import QueueFull, ShuttingDown
from lora_composer.serving.job_store import JobRecord, JobStoreError, Recorder, open_store, resolve_url
from lora_composer.serving.jobs import Job, RenderSpec
from lora_composer.serving.metrics import Metrics
from lora_composer.serving.requests import GenerateBody, LibraryNames, RequestError

log = logging.getLogger(__name__)

RETRIES = 3  # tries of one request on replicas that died under it


@dataclass
class RayOptions:
    replicas: int = 2
    gpus_per_replica: float = 0.0  # 1 on a GPU cluster: one replica per GPU
    cpus_per_replica: float = 1.0
    sets_per_replica: int = 16  # LoRA sets Serve counts as held by one replica (the routing's memory)


def lora_set_key(paths) -> str:
    """The multiplexing id of a LoRA set: its files' contents, in no particular order ("" for no LoRAs)."""
    digests = sorted({file_sha256(p) for p in paths})
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32] if digests else ""


def request_paths(body: GenerateBody, names: LibraryNames) -> list:
    """The library files ``body`` names (its ``loras`` and ``<lora:...>`` tags); ``RequestError`` for a name
    outside the library, as the replica would say. "auto" names none: the replica's retriever picks."""
    from lora_composer.prompt_syntax import parse_prompt

    if isinstance(body.loras, str):
        return []
    paths = [names.path(item.name, f"loras[{i}].name") for i, item in enumerate(body.loras)]
    if "<" in body.prompt:
        paths += [names.path(tag.name, "prompt") for tag in parse_prompt(body.prompt)[1]]
    return paths


class Renderer:
    """One model replica: a whole :class:`Server` whose ``render`` streams a request's events, then its PNG."""

    def __init__(self, config: ServerConfig):
        import ray

        self.server = Server(replace(config, jobs_url=None))  # the job store is the gateway's alone
        self.replica = ray.get_runtime_context().get_actor_name() or f"pid-{os.getpid()}"  # Ray's actor name
        self.loads = 0
        self._paths: dict[str, list] = {}
        self._fresh: set[str] = set()  # sets loaded for a request that has not yet said so

    async def _lora_set(self, key: str) -> str:
        """Serve's multiplexed loader: parse and attach the set's files once (on the batcher's thread); they
        stay attached, unpinned, until residency needs the room."""
        paths = self._paths.pop(key, [])

        def attach():
            self.server.residency.release(self.server.residency.acquire(paths))

        await asyncio.get_running_loop().run_in_executor(None, self.server.batcher.call, attach, 600.0)
        self.loads += 1
        self._fresh.add(key)
        return key

    async def render(self, body: dict):
        from ray import serve

        key = serve.get_multiplexed_model_id()
        routed = "none"
        job = None
        try:
            spec = self.server.spec(GenerateBody(**body))
            if key:
                self._paths[key] = [p for p, _ in spec.loras]
                await self._lora_set(key)  # Serve's cache: calls the loader only for a set this replica lacks
                routed = "loaded" if key in self._fresh else "resident"
                self._fresh.discard(key)
            job = self.server.batcher.submit(spec)
        except RequestError as exc:
            yield {"event": "refused", "status": exc.status, "error": str(exc)}
            return
        except QueueFull as exc:
            yield {"event": "refused", "status": 429, "error": str(exc), "retry_after": exc.retry_after}
            return
        except ShuttingDown as exc:
            yield {"event": "refused", "status": 503, "error": str(exc)}
            return
        except (ComposerError, ValueError, KeyError, TypeError) as exc:  # a LoRA that does not fit the model...
            yield {"event": "refused", "status": 422, "error": one_line(exc)}
            return
        yield {"event": "accepted", "replica": self.replica, "lora_set": routed}
        try:
            index = 0
            async with woken_by(job) as woken:
                while True:
                    events = job.events[index:]
                    index += len(events)
                    for event in events:
                        if event["event"] in ("started", "step"):
                            yield {k: v for k, v in event.items() if k != "job"}
                    if job.done:
                        break
                    if not events:
                        await woken(0.5)
            yield {"event": job.status, "png": job.png, "error": job.error, "status": job.http_status}
        finally:
            if not job.done:  # the gateway cancelled (its client left, or DELETE): stop working for it
                self.server.batcher.cancel(job.id)

    async def loras(self, query: str) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(None, self.server.loras, query)

    def health(self) -> dict:
        b = self.server.batcher
        return {
            "replica": self.replica,
            "queue_depth": b.queue_depth,
            "running": b.running,
            "adapters_attached": len(self.server.composer.runtime.adapters),
            "lora_sets_loaded": self.loads,
        }

    def __del__(self):  # Serve's graceful shutdown: finish what was accepted
        with contextlib.suppress(Exception):
            self.server.batcher.close(drain=True, timeout=self.server.config.drain_s)


class Gateway:
    """The HTTP face (FastAPI ingress): checks a request, fixes its seed, routes it by its LoRA set, retries it
    on another replica if its replica dies, and keeps the job table."""

    def __init__(self, renderer, config: ServerConfig, replicas: int):
        self.renderer = renderer
        self.config = config
        self.replicas = replicas
        self.names = LibraryNames(config.library)
        self.metrics = Metrics()
        self.jobs: dict[str, tuple[Job, asyncio.Task]] = {}
        self.retries = self.set_hits = self.set_loads = self.resumed = 0
        self.by_replica: dict[str, int] = {}
        self.store = open_store(config.jobs_url) if config.jobs_url else None
        self._resuming = None
        with contextlib.suppress(RuntimeError):  # Serve builds the gateway on its event loop: resume at once
            asyncio.get_running_loop()
            self.resume()

    def resume(self) -> None:
        """Run again every stored job that an earlier gateway accepted and did not finish, under its id and with
        its stored seed (so its image is the one the first run would have made). Once per gateway."""
        if self.store is None or self._resuming is not None:
            return
        self._resuming = True
        try:
            records = self.store.unfinished()
        except JobStoreError as exc:
            log.warning("stored jobs not resumed: %s", exc)
            return
        for record in records:
            try:
                body = GenerateBody(**record.request)
            except ValueError as exc:
                with contextlib.suppress(JobStoreError):
                    self.store.update(record.id, status="failed", error=f"request: {one_line(exc)}", http_status=422)
                continue
            with contextlib.suppress(JobStoreError):
                self.store.update(record.id, status="queued", step=0)
            job = self.start(body, record.id, resumed=True)
            Recorder(self.store, job)
            self.resumed += 1
            log.info("job %s: accepted before the gateway restarted, run again (seed %d)", record.id, body.seed)

    async def run(self, body: GenerateBody, job: Job, patient: bool = False) -> None:
        """Render ``body`` on a replica, its events into ``job``; a died replica's request is sent again.
        ``patient`` (a job run again after a restart): a full queue is waited out, not answered with 429."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            paths = request_paths(body, self.names)
            key = await asyncio.get_running_loop().run_in_executor(None, lora_set_key, paths)
        except RequestError as exc:
            self.metrics.reject(exc.status)
            return job.finish("failed", error=str(exc), http_status=exc.status)
        payload = body.model_dump()
        attempt = 0
        while True:
            stream = self.renderer.options(multiplexed_model_id=key, stream=True).render.remote(payload)
            try:
                async for event in stream:
                    kind = event["event"]
                    if kind == "refused" and patient and event["status"] == 429:
                        await asyncio.sleep(min(float(event.get("retry_after") or 1.0), 5.0))
                        break
                    if kind == "refused":
                        self.metrics.reject(event["status"])
                        job.retry_after = event.get("retry_after")
                        return job.finish("failed", error=event["error"], http_status=event["status"])
                    if kind == "accepted":
                        job.replica, job.lora_set = event["replica"], event["lora_set"]
                        self.by_replica[job.replica] = self.by_replica.get(job.replica, 0) + 1
                        self.set_hits += event["lora_set"] == "resident"
                        self.set_loads += event["lora_set"] == "loaded"
                    elif kind == "started":
                        job.start()
                    elif kind == "step":
                        job.emit("step", step=event["step"], steps=event["steps"])
                    else:
                        self.metrics.count(kind)
                        return job.finish(
                            kind, png=event.get("png"), error=event.get("error"), http_status=event.get("status", 200)
                        )
                else:
                    return job.finish(
                        "failed", error="internal error: the replica ended the stream early", http_status=500
                    )
                continue  # a full queue, waited out: not a lost replica
            except asyncio.CancelledError:
                stream.cancel()
                if job.cancel.is_set():  # its client's DELETE, or its client left
                    job.finish("cancelled", error="cancelled", http_status=499)
                else:  # the gateway is stopping: a stored job stays unfinished, to be run again at the next start
                    job.finish("cancelled", error="the gateway shut down", http_status=503)
                raise
            except (RayActorError, ActorUnavailableError) as exc:  # the replica died: send it again
                if attempt == RETRIES:
                    return job.finish(
                        "failed", error=f"replica lost {RETRIES + 1} times: {one_line(exc)}", http_status=503
                    )
                self.retries += 1
                attempt += 1
                job.emit("retry", attempt=attempt)
            except Exception as exc:  # noqa: BLE001 (a fault on the replica fails this request alone, in one line)
                self.metrics.count("failed")
                return job.finish("failed", error=f"internal error: {one_line(exc)}", http_status=500)

    def submit(self, body: GenerateBody, keep: bool = True) -> Job:
        """Start ``body`` as a job; with ``keep`` (``/v1/jobs``) and a store, the job is stored first, its seed
        fixed, so a gateway restart runs it again rather than forgetting it."""
        self.resume()
        if body.seed is None:  # fixed here, so a retry on another replica (or a rerun) renders the same image
            body = body.model_copy(update={"seed": random.randrange(2**32)})
        job = Job(RenderSpec(prompt=body.prompt, steps=body.steps or self.config.limits.default_steps))
        if keep and self.store is not None:
            try:
                self.store.put(JobRecord(id=job.id, request=body.model_dump(mode="json"), steps=job.spec.steps))
                Recorder(self.store, job)
            except JobStoreError as exc:
                log.warning("job %s: not saved: %s", job.id, exc)
        return self.start(body, job.id, job=job)

    def start(self, body: GenerateBody, job_id: str, job: Job | None = None, resumed: bool = False) -> Job:
        if job is None:
            job = Job(RenderSpec(prompt=body.prompt, steps=body.steps or self.config.limits.default_steps), job_id)
        job.replica = job.lora_set = job.retry_after = None
        if resumed:
            job.emit("resumed")
        task = asyncio.get_running_loop().create_task(self.run(body, job, patient=resumed))
        self.jobs[job.id] = (job, task)
        while len(self.jobs) > 256:
            oldest = next(iter(self.jobs))
            if not self.jobs[oldest][0].done:
                break
            del self.jobs[oldest]
        return job

    def gauges(self) -> dict[str, float]:
        return {
            "replicas": self.replicas,
            "ray_retries_total": self.retries,
            "lora_set_hits_total": self.set_hits,
            "lora_set_loads_total": self.set_loads,
            "jobs_resumed_total": self.resumed,
            "jobs_running": sum(not job.done for job, _ in self.jobs.values()),
        }


def result(job: Job | JobRecord) -> Response:
    headers = {"X-Job-Id": job.id, "X-Replica": job.replica or "", "X-LoRA-Set": job.lora_set or ""}
    if job.status == "done":
        return Response(job.png, media_type="image/png", headers=headers)
    if job.status in ("failed", "cancelled"):
        if job.http_status == 429 and job.retry_after is not None:
            headers["Retry-After"] = str(int(job.retry_after + 0.999))
        return error(job.http_status, job.error or job.status, headers)
    return error(409, f"job {job.id} is {job.status}: not done yet")


def build_app(config: ServerConfig, options: RayOptions):
    """The Serve application: ``serve.run(build_app(...))``. Paths in ``config`` must be absolute and readable
    on every node (a shared disk or the same layout)."""
    from ray import serve

    app = FastAPI(
        title="lora-composer (Ray Serve)",
        version="0.1.0",
        description="Many users and many LoRAs on text-to-image replicas.",
    )
    metrics = Metrics()
    guard(app, config.token, metrics)

    renderer_cls = type(
        "Renderer",
        (Renderer,),
        {"_lora_set": serve.multiplexed(max_num_models_per_replica=options.sets_per_replica)(Renderer._lora_set)},
    )
    renderer = serve.deployment(
        renderer_cls,
        name="Renderer",
        num_replicas=options.replicas,
        max_ongoing_requests=config.max_batch + config.max_queue,
        graceful_shutdown_timeout_s=config.drain_s + 5,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
    ).bind(config)

    # a dead gateway is noticed within seconds (Serve's default checks every 10 s): its successor resumes the jobs
    @serve.deployment(name="Gateway", max_ongoing_requests=1000, health_check_period_s=2)
    @serve.ingress(app)
    class GatewayDeployment(Gateway):
        def __init__(self, renderer, config, replicas):
            super().__init__(renderer, config, replicas)
            self.metrics = metrics

        @app.post("/v1/generate", response_class=Response)
        async def generate(self, body: GenerateBody, request: Request):
            job = self.submit(body, keep=False)  # its client waits on this connection
            deadline = time.monotonic() + self.config.request_timeout_s
            async with woken_by(job) as woken:
                while not job.done:
                    await woken(0.5)
                    if job.done:
                        break
                    if await request.is_disconnected() or time.monotonic() > deadline:
                        job.cancel.set()
                        self.jobs[job.id][1].cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await self.jobs[job.id][1]
                        if time.monotonic() > deadline:
                            return error(504, f"timeout: not done within {self.config.request_timeout_s:g} s")
                        return error(499, "cancelled: the client disconnected")
            return result(job)

        @app.post("/v1/jobs", status_code=202)
        async def create_job(self, body: GenerateBody):
            return JSONResponse(self.submit(body).summary(), status_code=202)

        def find(self, job_id: str):
            self.resume()
            entry = self.jobs.get(job_id)
            if entry:
                return entry[0]
            record = None
            if self.store is not None:
                try:
                    record = self.store.get(job_id)
                except JobStoreError as exc:
                    log.warning("job %s: not read: %s", job_id, exc)
            return record or error(404, f"job_id: no job {job_id!r} (finished jobs are kept a while)")

        @app.get("/v1/jobs/{job_id}")
        async def job_state(self, job_id: str):
            job = self.find(job_id)
            return job if isinstance(job, JSONResponse) else {**summary(job, job_id), "replica": job.replica}

        @app.get("/v1/jobs/{job_id}/result", response_class=Response)
        async def job_result(self, job_id: str):
            job = self.find(job_id)
            return job if isinstance(job, JSONResponse) else result(job)

        @app.delete("/v1/jobs/{job_id}")
        async def job_cancel(self, job_id: str):
            job = self.find(job_id)
            if isinstance(job, JSONResponse) or isinstance(job, JobRecord):
                return job if isinstance(job, JSONResponse) else job.summary()
            task = self.jobs[job_id][1]
            job.cancel.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return job.summary()

        @app.get("/v1/jobs/{job_id}/events")
        async def job_events(self, job_id: str, request: Request):
            job = self.find(job_id)
            if isinstance(job, JSONResponse):
                return job
            return event_stream(job, request) if isinstance(job, Job) else record_stream(job)

        @app.get("/v1/loras")
        async def loras(self, q: str = ""):
            return {"loras": await self.renderer.loras.remote(q.strip())}

        @app.get("/v1/health")
        async def health(self):
            replica = await self.renderer.health.remote()
            return {
                "status": "ok",
                "ray": True,
                "replicas": self.replicas,
                "model": self.config.model,
                "by_replica": dict(self.by_replica),
                "one_replica": replica,
            }

        @app.get("/metrics", response_class=PlainTextResponse)
        async def prometheus(self):
            return PlainTextResponse(self.metrics.render(self.gauges()), media_type="text/plain; version=0.0.4")

    return GatewayDeployment.bind(renderer, config, options.replicas)


def resolved(config: ServerConfig) -> ServerConfig:
    """``config`` with the model and library as absolute paths (the mini world built here, once, not by every
    replica at the same time)."""
    from lora_composer.default_model import resolve

    model, library = resolve(config.model, config.library)
    if library is None:
        from lora_composer.errors import ComposerError

        raise ComposerError("the server needs a LoRA library folder (--library DIR)")
    if model and os.path.exists(str(model)):
        model = os.path.abspath(str(model))
    jobs_url = config.jobs_url
    if jobs_url:  # a path as every node reads it (the gateway may start on another node after a restart)
        jobs_url = resolve_url(jobs_url)
    return replace(config, model=str(model), library=os.path.abspath(str(library)), jobs_url=jobs_url)
