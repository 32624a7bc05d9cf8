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
render alone. What cannot share a batch runs alone through :class:`~lora_composer.pipeline.ComposerPipeline`
between batches: strategies that derive adapters of their own (ties, dare, klora, tsv, activation-matched attach
them for one call), and pipelines this loop does not drive (anything but SD1.5-family and SDXL UNet
text-to-image pipelines: DiTs such as FLUX.1 and SD3).
Admission is first come, first served: a waiting request of another key stops new joins until the running
batch drains, so nothing waits forever.
"""

from __future__ import annotations

import collections
import copy
import inspect
import io
import threading
import time
import traceback

import torch

from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.fusion.base import StepPlan, Strategy
from lora_composer.pnginfo import GenerationRecord, png_info, sampler_name
from lora_composer.serving.jobs import Cancelled, Job, RenderSpec
from lora_composer.serving.metrics import Metrics


class QueueFull(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"the queue is full; retry in about {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


_UNET_PIPELINES = {"StableDiffusionPipeline": None, "StableDiffusionXLPipeline": "text_time"}


def batchable_pipeline(pipe) -> bool:
    """Whether :class:`Batcher` can drive ``pipe``'s denoising loop itself: an SD1.5-family UNet (text alone) or
    an SDXL one (text plus pooled embeddings and size ids), text to image."""
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    name = type(pipe).__name__
    return (
        unet is not None
        and name in _UNET_PIPELINES
        and getattr(config, "addition_embed_type", None) == _UNET_PIPELINES[name]
        and getattr(config, "time_cond_proj_dim", None) is None
    )


class _Active:
    """One request inside the running batch: its scheduler, generator, latents and prompt rows."""

    def __init__(self, job: Job, names: list[str], weights: list[float], scheduler, generator, latents, embeds,
                 cfg: bool, extra: dict):
        self.job = job
        self.names = names
        self.weights = weights
        self.scheduler = scheduler
        self.generator = generator
        self.latents = latents
        self.embeds = embeds  # [rows, tokens, dim]: (negative, positive) under guidance
        self.added: dict[str, torch.Tensor] = {}  # SDXL: text_embeds [rows, dim], time_ids [rows, 6]
        self.cfg = cfg
        self.extra = extra
        self.index = 0
        self.timesteps = scheduler.timesteps
        self.strategy: Strategy | None = None  # None: merge at the request's weights
        self.cache: dict[int, torch.Tensor] = {}  # row group -> its last prediction (for plans that reuse)
        self.plan: StepPlan | None = None
        self.todo: list[int] = [0]  # row groups computed this step

    @property
    def rows(self) -> int:
        return 2 if self.cfg else 1

    def plan_step(self, sample: torch.Tensor, t: torch.Tensor) -> None:
        """This step's plan and the row groups to compute (those not reused from the cache)."""
        if self.strategy is None:
            self.plan, self.todo = StepPlan(torch.tensor([self.weights], dtype=torch.float32)), [0]
            return
        inputs = {"sample": sample, "timestep": t, "encoder_hidden_states": self.embeds}
        if self.added:
            inputs["added_cond_kwargs"] = self.added
        self.strategy.observe(self.index, float(t), inputs)
        plan = self.strategy.plan(self.index, float(t))
        if plan.row_groups == 0:  # no adapters at all: the base model
            plan = StepPlan(torch.zeros(1, len(self.names)))
        if self.cache and max(self.cache) >= plan.row_groups:
            self.cache.clear()
        reuse = plan.reuse if plan.reuse is not None else torch.zeros(plan.row_groups, dtype=torch.bool)
        self.plan = plan
        self.todo = [g for g in range(plan.row_groups) if not (bool(reuse[g]) and g in self.cache)]

    def prediction(self, computed: torch.Tensor) -> torch.Tensor:
        """The step's prediction from the computed groups' rows (``[len(todo) * rows, ...]``), before guidance."""
        if self.strategy is None or (self.plan.row_groups == 1 and self.plan.reuse is None):
            return computed
        self.cache.update(zip(self.todo, computed.split(self.rows)))
        predictions = torch.stack([self.cache[g] for g in range(self.plan.row_groups)])
        return self.strategy.combine(predictions, self.plan).to(computed.dtype)


class Batcher:
    """The queue and the worker thread. ``submit(spec)`` returns a :class:`Job` (raising :class:`QueueFull`
    past ``max_queue`` waiting requests); ``close()`` stops accepting, then finishes or cancels the rest."""

    def __init__(self, composer, residency, metrics: Metrics | None = None, max_queue: int = 32,
                 max_batch: int = 8, batching: bool = True, keep_results: int = 256):
        self.composer = composer
        self.pipe = composer.pipe
        self.residency = residency
        self.metrics = metrics or Metrics()
        self.max_queue = int(max_queue)
        self.max_batch = max(1, int(max_batch))  # requests per denoiser pass
        self.batching = batching and batchable_pipeline(self.pipe)
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
                    self._finish(self._queue.popleft(), "cancelled", error="the server shut down before it started",
                                 http_status=503)
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
                traceback.print_exc()
                for act in self._active:
                    self._finish(act.job, "failed", error=f"internal error: {str(exc).splitlines()[0]}",
                                 http_status=500)
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
                if (not self._batchable(head) or head.spec.batch_key() != key
                        or len(self._active) >= self.max_batch):
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
        return (cls is not None and cls.derived_adapters is Strategy.derived_adapters and not cls.regional
                and cls.patched is Strategy.patched)

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
                traceback.print_exc()
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
        """Attach the request's adapters, encode its prompt with them, and set up its own sampler state."""
        spec, pipe = job.spec, self.pipe
        loras = self._resolve_loras(spec)
        names = self.residency.acquire([p for p, _, _ in loras])
        try:
            weights = [w for _, w, _ in loras]
            runtime = self.composer.runtime
            job.loras = [(n, runtime.adapters[n], w, te) for n, (_, w, te) in zip(names, loras)]
            device = pipe._execution_device
            cfg = spec.guidance > 1
            strategy, text = None, [te for _, _, te in loras]
            if spec.strategy != "merge":  # as ComposerPipeline begins it for a render alone
                strategy = get_strategy(spec.strategy, **spec.strategy_args)
                context = StrategyContext.from_pipeline(pipe, runtime, [runtime.adapters[n] for n in names],
                                                        spec.guidance)
                strategy.begin(names, weights, spec.steps, context)
                mask = strategy.text_mask()
                if mask is not None:
                    text = [w * float(m) for w, m in zip(text, mask)]
            runtime.set_weights(text=dict(zip(names, text)))
            embeds, added = self._encode(spec, device, cfg)
            scheduler = self._scheduler(spec.scheduler)
            scheduler.set_timesteps(spec.steps, device=device)
            generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(spec.seed)
            vae = int(pipe.vae_scale_factor)
            shape = (1, pipe.unet.config.in_channels, spec.height // vae, spec.width // vae)
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
            latents = latents * scheduler.init_noise_sigma
            params = set(inspect.signature(scheduler.step).parameters)
            extra = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in params}
        except BaseException:
            self.residency.release(names)
            raise
        if self._active:
            job.batched_with = max(job.batched_with, len(self._active))
        act = _Active(job, names, weights, scheduler, generator, latents, embeds, cfg, extra)
        act.strategy, act.added = strategy, added
        return act

    def _encode(self, spec: RenderSpec, device, cfg: bool) -> tuple[torch.Tensor, dict]:
        """The prompt's rows (``[negative, positive]`` under guidance) and, for SDXL, the UNet's added
        conditioning (pooled text embeddings and size ids), as the pipeline's own call computes them."""
        pipe = self.pipe
        negative_prompt = spec.negative_prompt or None
        if self.pipe.unet.config.addition_embed_type != "text_time":
            positive, negative = pipe.encode_prompt(spec.prompt, device, 1, cfg, negative_prompt)
            return (torch.cat([negative, positive]) if cfg else positive), {}
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=spec.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt)
        encoder_2 = getattr(pipe, "text_encoder_2", None)
        projection = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
        size = (spec.height, spec.width)
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=positive.dtype, text_encoder_projection_dim=projection)
        ids = ids.to(device)
        if not cfg:
            return positive, {"text_embeds": pooled, "time_ids": ids}
        return torch.cat([negative, positive]), {"text_embeds": torch.cat([negative_pooled, pooled]),
                                                 "time_ids": torch.cat([ids, ids])}

    def _decode(self, act: _Active) -> torch.Tensor:
        """The latents to an image tensor, as the pipeline decodes them (SDXL's latent statistics and fp16
        upcast included)."""
        vae = self.pipe.vae
        latents = act.latents
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, latents.shape[1], 1, 1)
            mean = torch.tensor(mean).view(view).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(view).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
            latents = latents.float()
        try:
            if self.pipe.unet.config.addition_embed_type == "text_time":
                image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
                watermark = getattr(self.pipe, "watermark", None)
                return watermark.apply_watermark(image) if watermark is not None else image
            return vae.decode(latents.to(vae.dtype), return_dict=False, generator=act.generator)[0]
        finally:
            if upcast:
                vae.to(torch.float16)

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
        runtime = self.composer.runtime
        slots = runtime.denoiser_mix.slots

        def slot_rows(act, weights: torch.Tensor) -> torch.Tensor:  # [groups, adapters] -> [groups * rows, slots]
            out = torch.zeros(len(act.todo), slots)
            for i, name in enumerate(act.names):
                out[:, runtime.slots[name]] = weights[act.todo, i]
            return out.repeat_interleave(act.rows, dim=0)

        rows, samples, times, embeds, counts = [], [], [], [], []
        added: dict[str, list] = {}
        for act in active:
            t = act.timesteps[act.index]
            x = act.scheduler.scale_model_input(torch.cat([act.latents] * act.rows), t)
            act.plan_step(x, t)
            groups = len(act.todo)
            samples.append(x.repeat(groups, *[1] * (x.dim() - 1)))
            times.append(t.reshape(1).expand(act.rows * groups))
            embeds.append(act.embeds.repeat(groups, 1, 1))
            for key, value in act.added.items():
                added.setdefault(key, []).append(value.repeat(groups, 1))
            rows.append(slot_rows(act, act.plan.weights))
            counts.append(act.rows * groups)
        layer_rows = {}
        for key in {k for act in active for k in (act.plan.layer_weights or {})}:  # the others: their rows
            layer_rows[key] = torch.cat([slot_rows(act, (act.plan.layer_weights or {}).get(key, act.plan.weights))
                                         for act in active])
        runtime.set_denoiser_rows(torch.cat(rows), layer_rows or None)
        start = time.perf_counter()
        if sum(counts):
            extra = {"added_cond_kwargs": {k: torch.cat(v) for k, v in added.items()}} if added else {}
            out = self.pipe.unet(torch.cat(samples), torch.cat(times), encoder_hidden_states=torch.cat(embeds),
                                 return_dict=False, **extra)[0]
        else:  # every request reuses every group's prediction this step
            out = torch.zeros(0, *active[0].latents.shape[1:], dtype=active[0].latents.dtype)
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_rows.observe(sum(counts))
        self.metrics.batch_requests.observe(len(active))
        for act in active:
            act.job.batched_with = max(act.job.batched_with, len(active) - 1)
        keep = []
        for act, computed in zip(active, out.split(counts)):
            pred = act.prediction(computed)
            if act.cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + act.job.spec.guidance * (text - uncond)
            t = act.timesteps[act.index]
            act.latents = act.scheduler.step(pred, t, act.latents, **act.extra, return_dict=False)[0]
            act.index += 1
            if not bool(torch.isfinite(act.latents).all()):
                self._fail(act, f"non-finite values (NaN/inf) at step {act.index} of {act.job.spec.steps}: "
                                "lower the LoRA weights")
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
        pipe, spec = self.pipe, act.job.spec
        try:
            image = self._decode(act)
            array = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])
            act.job.array = array[0]  # [h, w, 3] floats in [0, 1], what output_type="np" would give
            image = pipe.numpy_to_pil(array)[0]
            record = GenerationRecord(
                prompt=spec.prompt, negative_prompt=spec.negative_prompt, steps=spec.steps,
                guidance_scale=float(spec.guidance), seed=spec.seed, width=image.width, height=image.height,
                strategy=spec.strategy, model=self.composer.model,
                strategy_args={**spec.strategy_args, **(act.strategy.describe() if act.strategy else {})},
                loras=[{"name": n, "path": a.path, "te_weight": te, "unet_weight": w, "hash": a.metadata.short_hash}
                       for n, a, w, te in act.job.loras],
                sampler=sampler_name(type(act.scheduler).__name__), scheduler=type(act.scheduler).__name__,
                elapsed_s=round(time.monotonic() - act.job.started, 3),
            )
            self._finish(act.job, "done", png=_png(image, record), record=record)
        except Exception as exc:  # noqa: BLE001 (decoding one image fails that request only)
            traceback.print_exc()
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
                spec.prompt, negative_prompt=spec.negative_prompt or None, loras=[(p, te, w) for p, w, te in loras],
                strategy=spec.strategy, strategy_args=spec.strategy_args, num_inference_steps=spec.steps,
                guidance_scale=spec.guidance, seed=spec.seed, height=spec.height, width=spec.width,
                progress=False, fuse="auto", callback_on_step_end=on_step, limits=False,
            )
            record = self.composer.last_record
            self._finish(job, "done", png=_png(images[0], record), record=record)
        except Cancelled:
            self._finish(job, "cancelled", error="cancelled", http_status=499)
        except (ComposerError, ValueError, KeyError, TypeError) as exc:
            self._finish(job, "failed", error=one_line(exc), http_status=422)
        except Exception as exc:  # noqa: BLE001 (the server keeps serving the others)
            traceback.print_exc()
            self._finish(job, "failed", error=f"internal error: {one_line(exc)}", http_status=500)
        finally:
            self.pipe.scheduler = self.base_scheduler
            self.residency.release(names)


def _png(image, record) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(record))
    return buf.getvalue()


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
