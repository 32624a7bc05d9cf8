"""``compose serve``'s HTTP API (FastAPI): one model, its LoRA library, many clients.

    POST /v1/generate          the PNG (image/png, generation record inside), when it is done
    POST /v1/jobs              {"id", ...} at once; GET /v1/jobs/{id} its state, /events its progress (SSE),
                               /result its PNG; DELETE /v1/jobs/{id} cancels it
    GET  /v1/loras?q=          the library (names, trigger words); with q, ranked by the retriever
    GET  /v1/health            ok, queue depth, adapters attached
    GET  /metrics              Prometheus text
    GET  /docs                 the OpenAPI page

A refusal is ``{"error": "FIELD: why"}`` with a 4xx status; a full queue answers 429 with ``Retry-After``. When a
token is set, every route but health and the API description needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lora_composer.errors import ComposerError, one_line
from lora_composer.serving.adapter_cache import AdapterCache
from lora_composer.serving.batcher import Batcher, QueueFull, ShuttingDown
from lora_composer.serving.job_store import JobRecord, JobStoreError, Recorder, open_store
from lora_composer.serving.jobs import Job
from lora_composer.serving.metrics import Metrics
from lora_composer.serving.requests import (
    GenerateBody,
    LibraryNames,
    Limits,
    RequestError,
    check_strategy_args,
    to_spec,
)
from lora_composer.serving.residency import Residency

log = logging.getLogger(__name__)

PUBLIC = ("/v1/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")


@dataclass
class ServerConfig:
    model: str | None = None
    library: str | None = None
    device: str = "auto"  # where the model runs: auto, cuda, cuda:1, mps, cpu (resolved where the model loads)
    dtype: str = "auto"  # auto, fp32, fp16, bf16 (lora_composer.devices)
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_queue: int = 32
    max_batch: int = 8
    batching: bool = True
    cache_mb: int = 2048  # parsed adapters in host memory
    resident_mb: int = 1024  # attached adapters' factors
    max_resident: int = 64
    drain_s: float = 60.0  # at shutdown: how long accepted requests may take to finish
    request_timeout_s: float = 600.0
    jobs_url: str | None = None  # the job store (a SQLite file or redis://...); None: jobs live in memory only


class Server:
    """The pipeline, its caches and the batcher behind the app."""

    def __init__(self, config: ServerConfig, composer=None):
        from lora_composer.default_model import resolve
        from lora_composer.fusion.registry import available

        self.config = config
        if composer is None:
            from lora_composer.pipeline import ComposerPipeline

            model, library = resolve(config.model, config.library)
            if library is None:
                raise ComposerError("the server needs a LoRA library folder (--library DIR)")
            from lora_composer.devices import device_and_dtype

            device, dtype = device_and_dtype(config.device, config.dtype, str(model))
            composer = ComposerPipeline.from_pretrained(model, library=library, device=device, torch_dtype=dtype)
        if composer.library is None:
            raise ComposerError("the server needs a LoRA library folder (--library DIR)")
        self.composer = composer
        self.names = LibraryNames(composer.library)
        self.strategies = set(available())
        if getattr(composer.pipe, "device", None) is None or composer.pipe.device.type == "cpu":
            # room for the residency cap in every stack up front: address space until written on the CPU, so
            # attaching copies no stack (on a GPU the memory would be held: stacks double there instead)
            composer.runtime.reserve = config.max_resident
        self.cache = AdapterCache(config.cache_mb << 20)
        composer.adapter_loader = self.cache.load
        self.residency = Residency(composer, config.resident_mb << 20, config.max_resident)
        self.metrics = Metrics()
        self.batcher = Batcher(
            composer,
            self.residency,
            self.metrics,
            max_queue=config.max_queue,
            max_batch=config.max_batch,
            batching=config.batching,
        )
        self.store = open_store(config.jobs_url) if config.jobs_url else None
        self.reruns: dict[str, Job] = {}  # a stored job's id -> its rerun (the batcher gave it a new id)
        self.resumed = 0
        if self.store is not None:
            threading.Thread(target=self.resume, name="lora-composer-resume", daemon=True).start()

    def accept(self, body: GenerateBody, keep: bool = True) -> Job:
        """Check ``body`` and queue it; with ``keep`` (``/v1/jobs``) and a store, the job is stored with its
        request, seed fixed, so that it survives a restart."""
        spec = self.spec(body)
        job = self.batcher.submit(spec)
        if keep and self.store is not None:
            request = body.model_copy(update={"seed": spec.seed}).model_dump(mode="json")
            try:
                self.store.put(JobRecord(id=job.id, request=request, steps=spec.steps))
            except JobStoreError as exc:
                log.warning("job %s: not saved: %s", job.id, exc)
            else:
                Recorder(self.store, job)()  # and what happened since it was queued
        return job

    def resume(self) -> None:
        """Run again every stored job that was accepted but not finished (on its own thread: a full queue
        waits for room). Its stored seed makes the image the one the first run would have made."""
        try:
            records = self.store.unfinished()
        except JobStoreError as exc:
            log.warning("stored jobs not resumed: %s", exc)
            return
        for record in records:
            try:
                spec = self.spec(GenerateBody(**record.request))
            except (ComposerError, ValueError, TypeError) as exc:  # the library or the limits changed meanwhile
                self.store.update(record.id, status="failed", error=f"request: {one_line(exc)}", http_status=422)
                continue
            while True:
                try:
                    job = self.batcher.submit(spec)
                    break
                except QueueFull as exc:
                    time.sleep(min(exc.retry_after, 5.0))
                except ShuttingDown:
                    return
            self.reruns[record.id] = job
            while len(self.reruns) > self.batcher.keep_results:
                oldest = next(iter(self.reruns))
                if not self.reruns[oldest].done:
                    break
                del self.reruns[oldest]
            self.resumed += 1
            log.info("job %s: accepted before a restart, run again (seed %d)", record.id, spec.seed)
            with contextlib.suppress(JobStoreError):
                self.store.update(record.id, status="queued", step=0)
            Recorder(self.store, job, record.id)()

    def find(self, job_id: str) -> Job | JobRecord | None:
        """A live job (or the rerun of a stored one), else the store's record of a finished one."""
        job = self.batcher.jobs.get(job_id) or self.reruns.get(job_id)
        if job is not None or self.store is None:
            return job
        try:
            return self.store.get(job_id)
        except JobStoreError as exc:
            log.warning("job %s: not read: %s", job_id, exc)
            return None

    def spec(self, body: GenerateBody):
        spec = to_spec(body, self.names, self.config.limits, self.composer, self.strategies)
        if spec.strategy != "merge":
            check_strategy_args(spec.strategy, spec.strategy_args)
        return spec

    def gauges(self) -> dict[str, float]:
        return {
            "queue_depth": self.batcher.queue_depth,
            "running_requests": self.batcher.running,
            "adapters_attached": len(self.composer.runtime.adapters),
            "adapter_bytes_attached": self.residency.bytes,
            "adapter_evictions_total": self.residency.evictions,
            "adapter_cache_hits_total": self.cache.hits,
            "adapter_cache_misses_total": self.cache.misses,
            "adapter_cache_bytes": self.cache.bytes,
            "adapter_cache_entries": len(self.cache),
            "jobs_resumed_total": self.resumed,
        }

    def loras(self, query: str) -> list[dict]:
        """The library's files with their trigger words; with ``query``, those the retriever ranks, best first."""
        files = self.names.files()
        by_path = {p: rel for rel, p in files.items()}
        rows = {}
        with contextlib.suppress(Exception):  # no catalog yet: names only
            from lora_composer.retriever import Catalog

            with Catalog.for_library(self.names.library) as cat:
                for row in cat.rows():
                    rows[Path(row.path).resolve()] = row
        out = [
            {
                "name": rel,
                "size_mb": round(p.stat().st_size / 2**20, 3),
                "trigger_words": list(getattr(rows.get(p), "trigger_words", []) or []),
                "description": getattr(rows.get(p), "description", "") or "",
            }
            for rel, p in files.items()
        ]
        if not query:
            return out
        from lora_composer.retriever import retriever_for

        def search():
            self.composer.runtime.set_weights(text={})
            r = retriever_for(self.composer.pipe, self.names.library, family=self.composer.runtime.family)
            return r.search(query, limit=len(files) or 1)

        ranked = self.batcher.call(search)
        index = {item["name"]: item for item in out}
        result = []
        for m in ranked:
            rel = by_path.get(Path(m.path).resolve())
            if rel is not None and rel in index:
                result.append({**index[rel], "score": round(float(m.score), 4)})
        return result


@contextlib.asynccontextmanager
async def woken_by(job: Job):
    """``await woken(timeout)`` returns when ``job`` emits an event (or after ``timeout`` s), without a thread
    per waiting client: the worker's emit wakes the event loop."""
    loop = asyncio.get_running_loop()
    flag = asyncio.Event()

    def wake():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(flag.set)

    async def woken(timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(flag.wait(), timeout)
        flag.clear()

    job.subscribe(wake)
    try:
        yield woken
    finally:
        job.unsubscribe(wake)


def event_stream(job: Job, request: Request, job_id: str | None = None) -> StreamingResponse:
    """``job``'s events as server-sent events, from its first, until it is final or the client leaves (under
    ``job_id``, the id its client knows, where a rerun's live job has another)."""

    async def stream():
        index = 0
        async with woken_by(job) as woken:
            while True:
                events = job.events[index:]
                for event in events:
                    if job_id and event.get("job") != job_id:
                        event = {**event, "job": job_id}
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                index += len(events)
                if job.done and index >= len(job.events):
                    return
                if not events:
                    await woken(0.5)
                    if await request.is_disconnected():
                        return

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def record_stream(record: JobRecord) -> StreamingResponse:
    """A stored job's story as server-sent events: all that is left of it is its last state."""
    event = {"event": record.status, "job": record.id, **({"error": record.error} if record.error else {})}

    async def stream():
        yield f"event: {record.status}\ndata: {json.dumps(event)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def summary(job: Job | JobRecord, job_id: str) -> dict:
    """``job``'s state under the id its client knows (a rerun's live job has another)."""
    return {**job.summary(), "id": job_id}


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_line(exc: RequestValidationError) -> str:
    """``loras[0].weight: Input should be a valid number``: the field as the client wrote it (pydantic's union
    member tags such as ``list[LoraItem]`` left out), and the first reason."""
    err = exc.errors()[0] if exc.errors() else {}
    where = ""
    for part in err.get("loc", ()):
        if part == "body" or (isinstance(part, str) and ("[" in part or "(" in part)):
            continue
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "not a field of this request"
    return f"{where or 'body'}: {msg}"


def guard(app: FastAPI, token: str | None, metrics: Metrics) -> None:
    """The bearer token check (every route but ``PUBLIC``) and one-line 422s for bodies that do not parse."""

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        if token and request.url.path not in PUBLIC:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                metrics.reject(401)
                return error(401, "authorization: a bearer token is required", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.reject(422)
        return error(422, _validation_line(exc))


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over ``server``; closing the app (lifespan end) drains the server."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: server.batcher.close(drain=True, timeout=server.config.drain_s)
        )
        if server.store is not None:  # jobs past the drain stay unfinished there: the next start runs them
            server.store.close()

    app = FastAPI(
        title="lora-composer",
        version="0.1.0",
        lifespan=lifespan,
        description="Many users and many LoRAs on one text-to-image model.",
    )
    app.state.server = server
    guard(app, server.config.token, server.metrics)

    def submit(body: GenerateBody, keep: bool = True) -> Job | JSONResponse:
        try:
            return server.accept(body, keep)
        except RequestError as exc:
            server.metrics.reject(exc.status)
            return error(exc.status, str(exc))
        except QueueFull as exc:
            server.metrics.reject(429)
            return error(429, str(exc), {"Retry-After": str(int(exc.retry_after + 0.999))})
        except ShuttingDown as exc:
            server.metrics.reject(503)
            return error(503, str(exc))

    def result(job: Job | JobRecord, job_id: str | None = None) -> Response:
        if job.status == "done":
            return Response(job.png, media_type="image/png", headers={"X-Job-Id": job_id or job.id})
        if job.status in ("failed", "cancelled"):
            return error(job.http_status, job.error or job.status)
        return error(409, f"job {job_id or job.id} is {job.status}: not done yet")

    @app.post(
        "/v1/generate",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the PNG, with its generation record"}},
    )
    async def generate(body: GenerateBody, request: Request):
        job = submit(body, keep=False)  # its client waits on this connection: a restart answers it with an error
        if isinstance(job, JSONResponse):
            return job
        loop = asyncio.get_running_loop()
        deadline = loop.time() + server.config.request_timeout_s
        async with woken_by(job) as woken:
            while not job.done:
                await woken(0.5)
                if job.done:
                    break
                if await request.is_disconnected():  # the client left: stop working for it
                    server.batcher.cancel(job.id)
                    return error(499, "cancelled: the client disconnected")
                if loop.time() > deadline:
                    server.batcher.cancel(job.id)
                    return error(504, f"timeout: not done within {server.config.request_timeout_s:g} s (cancelled)")
        return result(job)

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: GenerateBody):
        job = submit(body)
        if isinstance(job, JSONResponse):
            return job
        return JSONResponse(job.summary(), status_code=202)

    def find(job_id: str) -> Job | JobRecord | JSONResponse:
        job = server.find(job_id)
        return job if job is not None else error(404, f"job_id: no job {job_id!r} (finished jobs are kept a while)")

    @app.get("/v1/jobs/{job_id}")
    async def job_state(job_id: str):
        job = find(job_id)
        return job if isinstance(job, JSONResponse) else summary(job, job_id)

    @app.get("/v1/jobs/{job_id}/result", response_class=Response)
    async def job_result(job_id: str):
        job = find(job_id)
        return job if isinstance(job, JSONResponse) else result(job, job_id)

    @app.delete("/v1/jobs/{job_id}")
    async def job_cancel(job_id: str):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        if isinstance(job, Job):
            server.batcher.cancel(job.id)
        return summary(job, job_id)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        job = find(job_id)
        if isinstance(job, JSONResponse):
            return job
        return event_stream(job, request, job_id) if isinstance(job, Job) else record_stream(job)

    @app.get("/v1/loras")
    async def loras(q: str = ""):
        try:
            items = await asyncio.get_running_loop().run_in_executor(None, server.loras, q.strip())
        except ShuttingDown as exc:
            return error(503, str(exc))
        return {"loras": items}

    @app.get("/v1/health")
    async def health():
        return {
            "status": "stopping" if server.batcher._closing else "ok",
            "model": server.composer.model,
            "queue_depth": server.batcher.queue_depth,
            "running": server.batcher.running,
            "adapters_attached": len(server.composer.runtime.adapters),
            "batching": server.batcher.batching,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.gauges()), media_type="text/plain; version=0.0.4")

    return app


def token_from_env() -> str | None:
    return os.environ.get("LORA_COMPOSER_TOKEN") or None
