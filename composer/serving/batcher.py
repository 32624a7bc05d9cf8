"""Step-level batching: requests with different LoRA sets share one denoiser pass per step.

One worker thread owns the pipeline. Requests that agree on what shapes a denoiser batch (image size and
sampler; :meth:`RenderSpec.batch_key`) run together: each denoiser call carries every active request's
rows (its unconditional and conditional rows under classifier-free guidance), each at its own timestep,
and the runtime's per-row mixing tensor gives each request's rows its own adapters and weights. Every
request keeps its own scheduler object, generator and latents, so a request that arrives mid-way joins at
the next step and leaves when its own steps are done, and its image is the one it would get alone.

Strategies take their rows in the same batch: each step a request's strategy plans its row groups (one per
group, or only those it does not reuse), its rows carry each group's weights (per layer group too), and its
own ``combine`` mixes its groups' predictions, as :class:`~lora_composer.driver.DenoiserDriver` does for a
render alone (both through :class:`~lora_composer.driver.RowGroups`). The family's pieces (encoding, latents,
timesteps, the denoiser's inputs, guidance, decoding) come from :mod:`lora_composer.render`: SD1.5-family
and SDXL UNets, FLUX.1 (Kontext without an input image) and SD3. What cannot share a batch runs alone
through :class:`~lora_composer.pipeline.ComposerPipeline` between batches: strategies that derive adapters
of their own (ties, dare, klora, tsv, activation-matched attach them for one call), regional prompts, and
pipelines :func:`~lora_composer.render.render_for` does not cover.
Admission is first come, first served: a waiting request of another key stops new joins until the running
batch drains, so nothing waits forever.
"""

from __future__ import annotations

import collections
import copy
import io
import logging
import threading
import time

import torch

from lora_composer.driver import SHARED_INPUTS, RowGroups, cat_rows, repeat_rows
from lora_composer.errors import ComposerError, one_line
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.fusion.base import Strategy
from lora_composer.pnginfo import png_info
from lora_composer.render import FamilyRender, generation_record, render_for
from lora_composer.serving.jobs import Cancelled, Job, RenderSpec
from lora_composer.serving.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(ComposerError):
    def __init__(self, retry_after: float):
        super().__init__(f"the queue is full; retry in about {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDown(ComposerError):
    pass


class _Active:
    """One request inside the running batch: its scheduler, generator, latents, per-row inputs and row groups."""

    def __init__(
        self,
        job: Job,
        names: list[str],
        groups: RowGroups,
        scheduler,
        generator,
        latents,
        cond: dict,
        rows: int,
        extra: dict,
    ):
        self.job = job
        self.names = names
        self.groups = groups
        self.scheduler = scheduler
        self.generator = generator
        self.latents = latents
        self.cond = cond  # the denoiser's inputs with one entry per row ((negative, positive) under guidance)
        self.rows = rows
        self.extra = extra  # scheduler.step's eta / generator
        self.index = 0
        self.timesteps = scheduler.timesteps


class Batcher:
    """The queue and the worker thread. ``submit(spec)`` returns a :class:`Job` (raising :class:`QueueFull`
    past ``max_queue`` waiting requests); ``close()`` stops accepting, then finishes or cancels the rest."""

    def __init__(
        self,
        composer,
        residency,
        metrics: Metrics | None = None,
        max_queue: int = 32,
        max_batch: int = 8,
        batching: bool = True,
        keep_results: int = 256,
    ):
        self.composer = composer
        self.pipe = composer.pipe
        self.residency = residency
        self.metrics = metrics or Metrics()
        self.max_queue = int(max_queue)
        self.max_batch = max(1, int(max_batch))  # requests per denoiser pass
        self.render: FamilyRender | None = render_for(self.pipe)
        self.batching = batching and self.render is not None
        self.keep_results = keep_results
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._queue: collections.deque[Job] = collections.deque()
        self._active: list[_Active] = []
        self._controls: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._recent_s: collections.deque[float] = collections.deque(maxlen=32)  # seconds per finished job
        self.base_scheduler = self.pipe.scheduler
        self._thread = threading.Thread(target=self._loop, name="lora-composer-batcher", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._active)

    def retry_after(self) -> float:
        """Seconds until a place in the queue frees up, roughly: the recent time per request over the batch."""
        per_job = (sum(self._recent_s) / len(self._recent_s)) if self._recent_s else 1.0
        return max(1.0, per_job * max(1, len(self._queue)) / (self.max_batch if self.batching else 1))

    def submit(self, spec: RenderSpec) -> Job:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            job = Job(spec)
            self.jobs[job.id] = job
            while len(self.jobs) > self.keep_results:
                old = next(iter(self.jobs.values()))
                if not old.done:
                    break
                self.jobs.popitem(last=False)
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        job.cancel.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled", error="cancelled before it started", http_status=499)
            self._cond.notify_all()
        return job

    def call(self, fn, timeout: float = 60.0):
        """Run ``fn()`` on the worker thread between two steps (the pipeline, the catalog and SQLite live there)."""
        done = threading.Event()
        box: dict = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 (handed back to the caller)
                box["error"] = exc
            done.set()

        with self._cond:
            if self._stopped:
                raise ShuttingDown("the server has stopped")
            self._controls.append(run)
            self._cond.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("the worker did not answer in time")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain``, finish every accepted request (queued ones too), else cancel the
        queued ones and finish the running batch. Returns when the worker has stopped (or ``timeout``)."""
        with self._cond:
            self._closing = True
            if not drain:
                while self._queue:
                    self._finish(
                        self._queue.popleft(),
                        "cancelled",
                        error="the server shut down before it started",
                        http_status=503,
                    )
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:  # past the timeout: nothing accepted is left without an answer
            for job in [*self._queue, *(a.job for a in self._active)]:
                job.cancel.set()
                self._finish(job, "cancelled", error="the server shut down", http_status=503)

    # -- the worker ----------------------------------------------------------------------------------
    def _finish(self, job: Job, status: str, **kwargs) -> None:
        if job.done:
            return
        job.finish(status, **kwargs)
        self.metrics.count(status)
        if job.started is not None and status == "done":
            self._recent_s.append(job.finished - job.started)
            self.metrics.request_seconds.observe(job.finished - job.created)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._controls or self._queue or self._active or self._closing):
                    self._cond.wait(0.5)
                controls = list(self._controls)
                self._controls.clear()
                if self._closing and not (self._queue or self._active or controls):
                    self._stopped = True
                    return
            for run in controls:
                run()
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as exc:  # a fault of the loop itself: fail the batch, keep serving
                log.exception("the batch loop failed: its %d requests fail, the server goes on", len(self._active))
                for act in self._active:
                    self._finish(act.job, "failed", error=f"internal error: {one_line(exc)}", http_status=500)
                    self.residency.release(act.names)
                self._active = []

    def _next(self) -> Job | None:
        """The next queued job that may start now (FIFO; one of another batch key waits for the batch to drain)."""
        with self._cond:
            while self._queue and self._queue[0].cancel.is_set():
                self._finish(self._queue.popleft(), "cancelled", error="cancelled before it started", http_status=499)
            if not self._queue:
                return None
            head = self._queue[0]
            if self._active:
                key = self._active[0].job.spec.batch_key()
                if not self._batchable(head) or head.spec.batch_key() != key or len(self._active) >= self.max_batch:
                    return None
            return self._queue.popleft()

    def _batchable(self, job: Job) -> bool:
        """Everything but strategies that attach adapters of their own for one call, read the prompt's regions
        or patch the denoiser's layers (they run alone)."""
        if not self.batching:
            return False
        if job.spec.strategy == "merge":
            return True
        from lora_composer.fusion.registry import STRATEGIES

        cls = STRATEGIES.get(job.spec.strategy)
        if cls is None or cls.derived_adapters is not Strategy.derived_adapters or cls.regional:
            return False
        try:
            return not get_strategy(cls.name, **job.spec.strategy_args).patches(self.render.denoiser)
        except ComposerError:  # bad arguments: the render alone says so
            return False

    def _admit(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            job.start()
            if not self._batchable(job):
                self._solo(job)
                continue
            try:
                self._active.append(self._prepare(job))
            except Cancelled:
                self._finish(job, "cancelled", error="cancelled", http_status=499)
            except (ComposerError, ValueError, KeyError, TypeError) as exc:
                self._finish(job, "failed", error=one_line(exc), http_status=422)
            except Exception as exc:  # noqa: BLE001 (this request fails alone: the batch goes on)
                log.exception("request %s failed", job.id)
                self._finish(job, "failed", error=f"internal error: {one_line(exc)}", http_status=500)

    def _resolve_loras(self, spec: RenderSpec) -> list[tuple]:
        """``[(file, denoiser weight, text-encoder weight)]``, one per file."""
        loras = spec.loras
        if isinstance(loras, str):  # "auto": the retriever picks from the library (on this thread: SQLite)
            loras = self.composer.choose_loras(spec.prompt)
        by_path = {}
        for path, weight in loras:  # one adapter per file: the last weight given wins
            by_path[str(path)] = (float(weight), float(spec.text_weights.get(str(path), weight)))
        return [(path, unet, text) for path, (unet, text) in by_path.items()]

    def _prepare(self, job: Job) -> _Active:
        """Attach the request's adapters, begin its strategy, encode its prompt with them, and set up its own
        sampler state (as ComposerPipeline does for a render alone)."""
        spec, render = job.spec, self.render
        loras = self._resolve_loras(spec)
        names = self.residency.acquire([p for p, _, _ in loras])
        try:
            weights = [w for _, w, _ in loras]
            runtime = self.composer.runtime
            adapters = [runtime.adapters[n] for n in names]
            job.loras = [(a, te, w) for a, (_, w, te) in zip(adapters, loras)]
            strategy = get_strategy(spec.strategy, **spec.strategy_args)
            strategy.begin(
                names, weights, spec.steps, StrategyContext.from_pipeline(self.pipe, runtime, adapters, spec.guidance)
            )
            text, mask = [te for _, _, te in loras], strategy.text_mask()
            if mask is not None:
                text = [w * float(m) for w, m in zip(text, mask)]
            runtime.set_weights(text=dict(zip(names, text)))
            cond = render.encode(spec.prompt, spec.negative_prompt, spec.guidance, spec.height, spec.width)
            scheduler = self._scheduler(spec.scheduler)
            device = render.device
            generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(spec.seed)
            dtype = cond["encoder_hidden_states"].dtype
            latents, own = render.start(scheduler, spec.steps, spec.height, spec.width, generator, dtype)
        except BaseException:
            self.residency.release(names)
            raise
        if self._active:
            job.batched_with = max(job.batched_with, len(self._active))
        return _Active(
            job,
            names,
            RowGroups(runtime, strategy, names),
            scheduler,
            generator,
            latents,
            {**cond, **own},
            render.rows(spec.guidance),
            render.step_extra(scheduler, generator),
        )

    def _scheduler(self, name: str):
        base = self.base_scheduler
        if not name or name == type(base).__name__:
            return copy.deepcopy(base)
        for cls in getattr(base, "compatibles", []):
            if cls.__name__ == name:
                return cls.from_config(base.config)
        raise ComposerError(f"scheduler: {name!r} is not available for this model")

    def _step(self) -> None:
        """One denoiser pass over every active request's rows, then each request's own scheduler step."""
        active = [a for a in self._active if not self._dropped(a)]
        self._active = active
        if not active:
            return
        render, runtime = self.render, self.composer.runtime
        calls = []
        for act in active:  # each request's inputs and plan; its row groups to compute repeat its rows
            t = act.timesteps[act.index]
            kwargs = render.inputs(act.scheduler, act.latents, t, act.rows, act.cond)
            act.groups.next(act.index, float(t), kwargs)
            calls.append(kwargs)
        layer_keys = {k for act in active for k in (act.groups.plan.layer_weights or {})}
        rows, layer_rows, inputs, counts = [], collections.defaultdict(list), [], []
        for act, kwargs in zip(active, calls):
            todo = act.groups.todo
            mix, per_layer = act.groups.mixing_rows(todo, act.rows, layer_keys)
            rows.append(mix)
            for key, value in per_layer.items():
                layer_rows[key].append(value)
            if todo:
                inputs.append(
                    repeat_rows({k: v for k, v in kwargs.items() if k not in SHARED_INPUTS}, act.rows, len(todo))
                )
            counts.append(act.rows * len(todo))
        runtime.set_denoiser_rows(torch.cat(rows), {k: torch.cat(v) for k, v in layer_rows.items()} or None)
        start = time.perf_counter()
        if inputs:
            shared = {k: v for k, v in calls[0].items() if k in SHARED_INPUTS}
            out = render.denoise({**cat_rows(inputs), **shared})
        else:  # every request reuses every group's prediction this step
            out = torch.zeros(0, *active[0].latents.shape[1:], dtype=active[0].latents.dtype)
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_rows.observe(sum(counts))
        self.metrics.batch_requests.observe(len(active))
        for act in active:
            act.job.batched_with = max(act.job.batched_with, len(active) - 1)
        keep = []
        for act, computed in zip(active, out.split(counts)):
            if act.groups.single:
                pred = computed
            else:
                act.groups.store(act.groups.todo, computed.split(act.rows))
                pred = act.groups.combine().to(computed.dtype)
            pred = render.guide(pred, act.job.spec.guidance)
            t = act.timesteps[act.index]
            act.latents = act.scheduler.step(pred, t, act.latents, **act.extra, return_dict=False)[0]
            act.index += 1
            if not bool(torch.isfinite(act.latents).all()):
                self._fail(
                    act,
                    f"non-finite values (NaN/inf) at step {act.index} of {act.job.spec.steps}: lower the LoRA weights",
                )
                continue
            act.job.emit("step", step=act.index, steps=act.job.spec.steps)
            if act.index >= len(act.timesteps):
                self._complete(act)
            else:
                keep.append(act)
        self._active = keep

    def _dropped(self, act: _Active) -> bool:
        if act.job.cancel.is_set():
            self._finish(act.job, "cancelled", error=f"cancelled at step {act.index}", http_status=499)
            self.residency.release(act.names)
            return True
        return False

    def _fail(self, act: _Active, message: str) -> None:
        self._finish(act.job, "failed", error=message, http_status=422)
        self.residency.release(act.names)

    def _complete(self, act: _Active) -> None:
        spec = act.job.spec
        try:
            image = self.render.decode(act.latents, act.generator, spec.height, spec.width)
            act.job.array, image = self.render.postprocess(image)  # the array: what output_type="np" gives
            record = generation_record(
                self.composer.model,
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt,
                steps=spec.steps,
                guidance=spec.guidance,
                seed=spec.seed,
                size=(image.height, image.width),
                strategy=spec.strategy,
                strategy_args={**spec.strategy_args, **act.groups.strategy.describe()},
                loras=act.job.loras,
                scheduler=act.scheduler,
                elapsed_s=time.monotonic() - act.job.started,
            )
            self._finish(act.job, "done", png=_png(image, record), record=record)
        except Exception as exc:  # noqa: BLE001 (decoding one image fails that request only)
            log.exception("request %s failed", act.job.id)
            self._finish(act.job, "failed", error=f"internal error: {one_line(exc)}", http_status=500)
        finally:
            self.residency.release(act.names)

    def _solo(self, job: Job) -> None:
        """A request that cannot share a batch: the whole render through ComposerPipeline, now."""
        spec = job.spec
        names: list[str] = []
        try:
            loras = self._resolve_loras(spec)
            names = self.residency.acquire([p for p, _, _ in loras] + [str(p) for p in spec.region_loras])
            if self.base_scheduler is not self.pipe.scheduler:
                self.pipe.scheduler = self.base_scheduler
            if spec.scheduler and spec.scheduler != type(self.base_scheduler).__name__:
                self.pipe.scheduler = self._scheduler(spec.scheduler)

            def on_step(pipe, i, t, kwargs):
                if job.cancel.is_set():
                    raise Cancelled()
                job.emit("step", step=i + 1, steps=spec.steps)
                return kwargs

            images = self.composer(
                spec.prompt,
                negative_prompt=spec.negative_prompt or None,
                loras=[(p, te, w) for p, w, te in loras],
                strategy=spec.strategy,
                strategy_args=spec.strategy_args,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                seed=spec.seed,
                height=spec.height,
                width=spec.width,
                progress=False,
                fuse="auto",
                callback_on_step_end=on_step,
                limits=False,
            )
            record = self.composer.last_record
            self._finish(job, "done", png=_png(images[0], record), record=record)
        except Cancelled:
            self._finish(job, "cancelled", error="cancelled", http_status=499)
        except (ComposerError, ValueError, KeyError, TypeError) as exc:
            self._finish(job, "failed", error=one_line(exc), http_status=422)
        except Exception as exc:  # noqa: BLE001 (the server keeps serving the others)
            log.exception("request %s failed", job.id)
            self._finish(job, "failed", error=f"internal error: {one_line(exc)}", http_status=500)
        finally:
            self.pipe.scheduler = self.base_scheduler
            self.residency.release(names)


def _png(image, record) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(record))
    return buf.getvalue()
