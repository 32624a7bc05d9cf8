"""One render's pieces per model family, for a denoising loop that carries many renders in one batch.

A family object answers what the diffusers pipeline's own loop does for one image: encode the prompt into
the denoiser's per-row inputs, start the latents and the sampler's timesteps, the denoiser's keyword
arguments for a step, the guided prediction, and the decoded image. They are built from the pipelines'
public pieces (``encode_prompt``, ``prepare_latents``, ``retrieve_timesteps`` / ``calculate_shift``, the VAE and
image processor), never from their private methods, and each family is tested against the diffusers pipeline's own
render with the same LoRAs loaded by diffusers.

:meth:`FamilyRender.render` is the whole loop for one call (several images per prompt, negative prompts,
``clip_skip``, a step callback, progress bar, ``output_type``): :class:`~lora_composer.pipeline.ComposerPipeline`
runs through it, the server's batcher through the same pieces with many renders in one batch.

Families: SD1.5-style UNets (text only), SDXL (pooled text and size ids), FLUX.1 and Kontext without an
input image (guidance distilled into the transformer, so one row per image), SD3 (joint attention).
``render_for(pipe)`` is None for anything else (image-to-image pipelines, UNets with timestep conditioning).

:func:`generation_record` builds the record that every image carries, for the pipeline and the server alike.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from lora_composer.pnginfo import GenerationRecord, sampler_name


def generation_record(
    model: str,
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance: float,
    seed: int,
    size: tuple,
    strategy: str,
    strategy_args: dict,
    loras,
    scheduler,
    elapsed_s: float,
):
    """The :class:`GenerationRecord` of one image (``loras``: ``(adapter, te weight, unet weight)``; ``size``:
    ``(height, width)`` as rendered)."""
    height, width = size
    return GenerationRecord(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        steps=int(steps),
        guidance_scale=float(guidance),
        seed=int(seed),
        width=int(width) if width else None,
        height=int(height) if height else None,
        strategy=strategy,
        strategy_args=strategy_args,
        model=model,
        loras=[
            {"name": a.name, "path": a.path, "te_weight": te, "unet_weight": unet, "hash": a.metadata.short_hash}
            for a, te, unet in loras
        ],
        sampler=sampler_name(type(scheduler).__name__),
        scheduler=type(scheduler).__name__,
        elapsed_s=round(float(elapsed_s), 3),
    )


class FamilyRender:
    """The pieces shared by every family; subclasses fill in what differs."""

    #: the diffusers pipeline call's keyword arguments a family's :meth:`render` takes besides those every family
    #: takes (:data:`COMMON`); any other one not at the pipeline's default sends the call to the pipeline itself
    takes: frozenset = frozenset()
    COMMON = frozenset({"output_type", "callback_on_step_end", "callback_on_step_end_tensor_inputs"})

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = getattr(pipe, "unet", None) or pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device if hasattr(self.pipe, "_execution_device") else torch.device("cpu")

    def covers(self, kwargs: dict) -> bool:
        """Whether :meth:`render` does what the pipeline's own call would with these extra keyword arguments:
        each is one this family takes, or the pipeline's own default (so passing it changes nothing)."""
        defaults = inspect.signature(type(self.pipe).__call__).parameters
        for key, value in kwargs.items():
            if key == "callback_on_step_end":  # a PipelineCallback edits the pipeline's own state
                if value is not None and hasattr(value, "tensor_inputs"):
                    return False
            elif key == "callback_on_step_end_tensor_inputs":
                if not set(value or ()) <= {"latents"}:
                    return False
            elif key in self.takes or key in self.COMMON:
                continue
            elif key not in defaults or not _is_default(value, defaults[key].default):
                return False
        return kwargs.get("output_type", "pil") in ("pil", "np", "pt")

    def size(self, height, width, **kwargs) -> tuple[int, int]:
        """The render's ``(height, width)`` as the pipeline sets it (its default sample size where not given)."""
        if height and width:
            return int(height), int(width)
        sample = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        sample = sample if isinstance(sample, (list, tuple)) else (sample, sample)
        vae = int(self.pipe.vae_scale_factor)
        return int(sample[0]) * vae, int(sample[-1]) * vae

    def uses_cfg(self, guidance: float) -> bool:
        """Whether a render runs an unconditional row beside its conditional one (classifier-free guidance)."""
        return guidance > 1

    def rows(self, guidance: float) -> int:
        return 2 if self.uses_cfg(guidance) else 1

    def guide(self, prediction: torch.Tensor, guidance: float) -> torch.Tensor:
        """A render's rows' predictions -> its guided prediction (``[uncond, cond]`` under guidance)."""
        if not self.uses_cfg(guidance):
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + guidance * (cond - uncond)

    def step_extra(self, scheduler, generator) -> dict:
        """The keyword arguments the pipeline gives ``scheduler.step`` (``eta``, ``generator``) where it takes them."""
        params = set(inspect.signature(scheduler.step).parameters)
        return {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in params}

    def denoise(self, kwargs: dict) -> torch.Tensor:
        """One denoiser pass over a batch's keyword arguments; its prediction. The sample goes first and by
        position, as the pipelines pass it, so a denoiser that names it otherwise takes it too."""
        kwargs = dict(kwargs)
        sample = kwargs.pop("sample", None)
        if sample is None:
            sample = kwargs.pop("hidden_states")
        return self.denoiser(sample, **kwargs, return_dict=False)[0]

    def pass_context(self):
        """The context the pipeline runs each denoiser pass under (FLUX.1: the cache context ``"cond"``)."""
        return contextlib.nullcontext()

    def postprocess(self, image: torch.Tensor):
        """Decoded image -> (``[h, w, 3]`` floats in [0, 1], as ``output_type="np"`` gives, and the PIL image)."""
        array = self.pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])
        return array[0], self.pipe.numpy_to_pil(array)[0]

    def output(self, image: torch.Tensor, output_type: str, dtype):
        """Decoded images -> what the pipeline returns for ``output_type`` (``"pil"``, ``"np"``, ``"pt"``)."""
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    def render(
        self,
        *,
        steps: int,
        guidance: float,
        height: int | None,
        width: int | None,
        generator,
        images: int = 1,
        prompt=None,
        negative_prompt=None,
        text: dict | None = None,
        output_type: str = "pil",
        callback=None,
        callback_inputs=("latents",),
        **extra,
    ):
        """One call's images, as the diffusers pipeline's own loop renders them: encode (``text``: more of
        ``encode_prompt``'s keyword arguments, such as precomputed embeddings or ``clip_skip``), start the
        latents on the pipeline's scheduler, per step the denoiser (through whatever hooks it carries: the
        driver's row groups), guidance, ``scheduler.step`` and ``callback(pipe, i, t, {"latents": ...})``,
        then decode. ``extra``: the family's own call arguments (:attr:`takes`)."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        height, width = self.size(height, width, **extra)
        cond = self.encode(
            prompt, negative_prompt, guidance, height, width, images=images, **(text or {}), **self._encode_extra(extra)
        )
        dtype = cond["encoder_hidden_states"].dtype
        latents, own = self.start(scheduler, steps, height, width, generator, dtype, images=images)
        cond = {**cond, **own}
        step_extra = self._step_extra(scheduler, generator, extra)
        timesteps, rows = scheduler.timesteps, self.rows(guidance)
        warmup = max(len(timesteps) - steps * scheduler.order, 0)
        with pipe.progress_bar(total=steps) as bar:
            for i, t in enumerate(timesteps):
                with self.pass_context():
                    prediction = self.denoise(self.inputs(scheduler, latents, t, rows, cond))
                prediction = self.guide(prediction, guidance)
                latents = scheduler.step(prediction, t, latents, **step_extra, return_dict=False)[0]
                if callback is not None:
                    out = callback(pipe, i, t, {k: latents for k in callback_inputs if k == "latents"})
                    latents = out.pop("latents", latents) if out else latents
                if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % scheduler.order == 0):
                    bar.update()
        image = self.decode(latents, generator, height, width)
        result = self.output(image, output_type, dtype)
        pipe.maybe_free_model_hooks()
        return result

    def _encode_extra(self, extra: dict) -> dict:
        return {}

    def _step_extra(self, scheduler, generator, extra: dict) -> dict:
        return self.step_extra(scheduler, generator)


def _is_default(value, default) -> bool:
    """``value`` is the pipeline parameter's default (plain values only: a tensor or an image never is)."""
    if value is None or default is None:
        return value is default
    plain = (bool, int, float, str)
    return (
        isinstance(value, plain)
        and isinstance(default, plain)
        and isinstance(value, str) == isinstance(default, str)
        and value == default
    )


class UNetRender(FamilyRender):
    """Stable Diffusion 1.x/2.x (text only) and SDXL (text, pooled text and size ids) text-to-image UNets."""

    takes = frozenset({"clip_skip", "eta"})

    def __init__(self, pipe):
        super().__init__(pipe)
        self.sdxl = self.denoiser.config.addition_embed_type == "text_time"

    def encode(
        self, prompt: str, negative_prompt: str, guidance: float, height: int, width: int, images: int = 1, **text
    ) -> dict:
        """The denoiser's per-row text inputs (``text``: more of ``encode_prompt``'s keyword arguments)."""
        pipe, cfg = self.pipe, self.uses_cfg(guidance)
        negative_prompt = negative_prompt or None
        if not self.sdxl:
            positive, negative = pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=images,
                do_classifier_free_guidance=cfg,
                negative_prompt=negative_prompt,
                **text,
            )
            return {"encoder_hidden_states": torch.cat([negative, positive]) if cfg else positive}
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=self.device,
            num_images_per_prompt=images,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
            **text,
        )
        # SDXL's size conditioning as the pipeline gives it by default: original = target = the render's size,
        # no crop (original size, crop top-left, target size)
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=positive.dtype, device=self.device)
        ids = ids.repeat(positive.shape[0], 1)
        if not cfg:
            return {"encoder_hidden_states": positive, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        return {
            "encoder_hidden_states": torch.cat([negative, positive]),
            "added_cond_kwargs": {
                "text_embeds": torch.cat([negative_pooled, pooled]),
                "time_ids": torch.cat([ids, ids]),
            },
        }

    def _encode_extra(self, extra: dict) -> dict:
        return {"clip_skip": extra["clip_skip"]} if extra.get("clip_skip") is not None else {}

    def _step_extra(self, scheduler, generator, extra: dict) -> dict:
        out = self.step_extra(scheduler, generator)
        if "eta" in out and extra.get("eta") is not None:
            out["eta"] = extra["eta"]
        return out

    def start(
        self, scheduler, steps: int, height: int, width: int, generator, dtype, images: int = 1
    ) -> tuple[torch.Tensor, dict]:
        scheduler.set_timesteps(steps, device=self.device)
        vae = int(self.pipe.vae_scale_factor)
        shape = (images, self.denoiser.config.in_channels, height // vae, width // vae)
        # the pipeline's prepare_latents reads the pipeline's scheduler; each render here has its own
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        return latents * scheduler.init_noise_sigma, {}

    def inputs(self, scheduler, latents: torch.Tensor, t: torch.Tensor, rows: int, cond: dict) -> dict:
        sample = scheduler.scale_model_input(torch.cat([latents] * rows), t)
        return {"sample": sample, "timestep": t.reshape(1).expand(sample.shape[0]), **cond}

    def decode(self, latents: torch.Tensor, generator, height: int, width: int) -> torch.Tensor:
        """As the pipeline decodes (SDXL's latent statistics, fp16 upcast and watermark included)."""
        vae = self.pipe.vae
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
            if self.sdxl:
                image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
                watermark = getattr(self.pipe, "watermark", None)
                return watermark.apply_watermark(image) if watermark is not None else image
            return vae.decode(latents.to(vae.dtype), return_dict=False, generator=generator)[0]
        finally:
            if upcast:
                vae.to(torch.float16)

    def output(self, image: torch.Tensor, output_type: str, dtype):
        """SD1.x/2.x: the pipeline's safety checker (where it has one) first; then as the pipeline postprocesses."""
        if self.sdxl:
            return self.pipe.image_processor.postprocess(image, output_type=output_type)
        denormalize = [True] * image.shape[0]
        checker = getattr(self.pipe, "run_safety_checker", None)
        if checker is not None:
            image, nsfw = checker(image, self.device, dtype)
            if nsfw is not None:
                denormalize = [not flagged for flagged in nsfw]
        return self.pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)


def _flow_timesteps(pipeline_module, scheduler, steps: int, tokens: int, device, sigmas=None, max_shift=1.15) -> None:
    """``scheduler``'s timesteps as the FLUX.1 / SD3 pipelines set them (the resolution shift ``mu`` where the
    scheduler shifts dynamically)."""
    mu = pipeline_module.calculate_shift(
        tokens,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", max_shift),
    )
    pipeline_module.retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)


class FluxRender(FamilyRender):
    """FLUX.1 (and Kontext without an input image): packed latents, guidance as the transformer's input (one row
    per image; true CFG runs alone through the pipeline)."""

    takes = frozenset({"max_sequence_length", "max_area"})

    def uses_cfg(self, guidance: float) -> bool:
        return False

    def size(self, height, width, max_area=None, **kwargs) -> tuple[int, int]:
        """Kontext rescales the size to ``max_area`` (its pipeline's default where not given), in multiples of
        twice the VAE's scale, keeping the aspect ratio."""
        height, width = super().size(height, width)
        params = inspect.signature(type(self.pipe).__call__).parameters
        if "max_area" not in params:
            return height, width
        area = params["max_area"].default if max_area is None else max_area
        aspect, multiple = width / height, int(self.pipe.vae_scale_factor) * 2
        width, height = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        return height // multiple * multiple, width // multiple * multiple

    def encode(
        self, prompt: str, negative_prompt: str, guidance: float, height: int, width: int, images: int = 1, **text
    ) -> dict:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, num_images_per_prompt=images, **text
        )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
        if self.denoiser.config.guidance_embeds:
            cond["guidance"] = torch.full([embeds.shape[0]], float(guidance), device=self.device, dtype=torch.float32)
        return cond

    def _encode_extra(self, extra: dict) -> dict:
        length = extra.get("max_sequence_length")
        return {"max_sequence_length": length} if length is not None else {}

    def step_extra(self, scheduler, generator) -> dict:
        """None: the FLUX.1 pipelines call ``scheduler.step`` with no more arguments."""
        return {}

    def pass_context(self):
        cache_context = getattr(self.denoiser, "cache_context", None)
        if type(self.pipe).__name__ == "FluxPipeline" and cache_context is not None:
            return cache_context("cond")
        return contextlib.nullcontext()

    def _prepare(self, height: int, width: int, generator, dtype, images: int = 1):
        channels = self.denoiser.config.in_channels // 4
        if "image" in inspect.signature(self.pipe.prepare_latents).parameters:  # Kontext: no input image here
            latents, _, ids, _ = self.pipe.prepare_latents(
                None, images, channels, height, width, dtype, self.device, generator
            )
            return latents, ids
        return self.pipe.prepare_latents(images, channels, height, width, dtype, self.device, generator)

    def start(
        self, scheduler, steps: int, height: int, width: int, generator, dtype, images: int = 1
    ) -> tuple[torch.Tensor, dict]:
        from diffusers.pipelines.flux import pipeline_flux

        latents, img_ids = self._prepare(height, width, generator, dtype, images)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        _flow_timesteps(pipeline_flux, scheduler, steps, latents.shape[1], self.device, sigmas=sigmas)
        if hasattr(scheduler, "set_begin_index"):  # as the pipelines do
            scheduler.set_begin_index(0)
        return latents, {"img_ids": img_ids}

    def inputs(self, scheduler, latents: torch.Tensor, t: torch.Tensor, rows: int, cond: dict) -> dict:
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        return {"hidden_states": latents, "timestep": timestep, **cond}

    def decode(self, latents: torch.Tensor, generator, height: int, width: int) -> torch.Tensor:
        vae, factor = self.pipe.vae, int(self.pipe.vae_scale_factor)
        # packed 2x2 patches -> [batch, channels, h, w] (the pipeline's unpacking)
        h, w = 2 * (int(height) // (factor * 2)), 2 * (int(width) // (factor * 2))
        b, _, c = latents.shape
        latents = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, h, w)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0]


class SD3Render(FamilyRender):
    """Stable Diffusion 3: joint attention over CLIP and T5 tokens, pooled CLIP text, flow matching."""

    takes = frozenset({"max_sequence_length", "clip_skip"})

    def encode(
        self, prompt: str, negative_prompt: str, guidance: float, height: int, width: int, images: int = 1, **text
    ) -> dict:
        cfg = self.uses_cfg(guidance)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=images,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt or None,
            **text,
        )
        if cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _encode_extra(self, extra: dict) -> dict:
        return {k: extra[k] for k in ("max_sequence_length", "clip_skip") if extra.get(k) is not None}

    def step_extra(self, scheduler, generator) -> dict:
        """None: the SD3 pipeline calls ``scheduler.step`` with no more arguments."""
        return {}

    def start(
        self, scheduler, steps: int, height: int, width: int, generator, dtype, images: int = 1
    ) -> tuple[torch.Tensor, dict]:
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as sd3

        channels = self.denoiser.config.in_channels
        latents = self.pipe.prepare_latents(images, channels, height, width, dtype, self.device, generator)
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.denoiser.config.patch_size
            tokens = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            _flow_timesteps(sd3, scheduler, steps, tokens, self.device, max_shift=1.16)
        else:
            sd3.retrieve_timesteps(scheduler, steps, self.device)
        return latents, {}

    def inputs(self, scheduler, latents: torch.Tensor, t: torch.Tensor, rows: int, cond: dict) -> dict:
        sample = torch.cat([latents] * rows)
        return {"hidden_states": sample, "timestep": t.expand(sample.shape[0]), **cond}

    def decode(self, latents: torch.Tensor, generator, height: int, width: int) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latents, return_dict=False)[0]


_UNET_PIPELINES = {"StableDiffusionPipeline": None, "StableDiffusionXLPipeline": "text_time"}
_DIT_PIPELINES = {"FluxPipeline": FluxRender, "FluxKontextPipeline": FluxRender, "StableDiffusion3Pipeline": SD3Render}


def render_for(pipe) -> FamilyRender | None:
    """The family render for ``pipe``'s text-to-image loop, or None where none applies."""
    name = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        config = unet.config
        if (
            name in _UNET_PIPELINES
            and getattr(config, "addition_embed_type", None) == _UNET_PIPELINES[name]
            and getattr(config, "time_cond_proj_dim", None) is None
        ):
            return UNetRender(pipe)
        return None
    return _DIT_PIPELINES[name](pipe) if name in _DIT_PIPELINES else None
