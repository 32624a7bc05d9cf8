"""``ComposerPipeline``: a diffusers text-to-image pipeline that composes LoRAs.

It owns a :class:`~lora_composer.runtime.LoraRuntime` on the wrapped pipeline. Adapters stay attached
between calls (an adapter not asked for gets weight 0, which costs nothing), so switching is a
tensor write; ``unload_lora``/``unload_all`` give the base pipeline back exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch

from lora_composer.adapters import load_adapter
from lora_composer.adapters.embeddings import attach_embeddings, detach_embeddings
from lora_composer.adapters.types import Adapter
from lora_composer.driver import DenoiserDriver
from lora_composer.errors import ComposerError, one_line
from lora_composer.library import lora_name, resolve_lora
from lora_composer.pnginfo import GenerationRecord
from lora_composer.prompt_syntax import LoraRef, parse_prompt, split_regions
from lora_composer.render import generation_record, render_for
from lora_composer.runtime import LoraRuntime
from lora_composer.vocab import DEFAULT_GUIDANCE, MAX_SEED, MODEL_DEFAULTS_FILE
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.fusion.registry import AUTO, resolve_auto
from lora_composer.fusion.base import Region


class _TruncationInOneLine(logging.Filter):
    """diffusers echoes the whole cut-off part of a long prompt (33 KB for a 5,000-word one): one line says
    where the cut is and how much is dropped."""

    PREFIX = "The following part of your input was truncated"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            head, _, dropped = message.partition(" tokens: ")
            record.msg = f"{head} tokens: the rest of the prompt is dropped ({len(dropped):,} characters as decoded)"
            record.args = None
        return True


@contextlib.contextmanager
def _truncation_in_one_line():
    """While rendering, diffusers' own log handlers print long-prompt truncation in one line."""
    handlers, one_line_filter = list(logging.getLogger("diffusers").handlers), _TruncationInOneLine()
    for handler in handlers:
        handler.addFilter(one_line_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(one_line_filter)


def _as_ref(item) -> LoraRef:
    """``"name"``, ``(name, w)``, ``(name, te, unet)`` or a :class:`LoraRef` -> ``LoraRef``."""
    if isinstance(item, LoraRef):
        return item
    if isinstance(item, (str, os.PathLike)):
        return LoraRef(os.fspath(item))
    if isinstance(item, dict):
        te = float(item.get("te_weight", item.get("weight", 1.0)))
        return LoraRef(os.fspath(item.get("path") or item["name"]), te, float(item.get("unet_weight", te)))
    ref, *weights = item
    if len(weights) == 1:
        return LoraRef(os.fspath(ref), float(weights[0]), float(weights[0]))
    if len(weights) == 2:
        return LoraRef(os.fspath(ref), float(weights[0]), float(weights[1]))
    raise ComposerError(f"cannot read LoRA spec {item!r}: use (path_or_name, weight) or (path_or_name, te, unet)")


def model_defaults(model: str | os.PathLike) -> dict:
    """The model folder's own defaults (:data:`~lora_composer.vocab.MODEL_DEFAULTS_FILE`), or ``{}``."""
    path = Path(os.fspath(model)).expanduser() / MODEL_DEFAULTS_FILE if model else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ComposerError(f"{path}: cannot read the model's defaults ({exc})") from None
    if not isinstance(data, dict):
        raise ComposerError(f'{path}: expected a JSON object such as {{"guidance_scale": 5}}')
    return data


def native_size(pipe, config, vae: int) -> tuple[int, int] | None:
    """The pipeline's default ``(height, width)`` in pixels, from its sample size (``None`` if unknown)."""
    sample = getattr(pipe, "default_sample_size", None) or getattr(config, "sample_size", None)
    if isinstance(sample, (list, tuple)):
        return int(sample[0]) * vae, int(sample[-1]) * vae
    return (int(sample) * vae, int(sample) * vae) if sample else None


# Pipelines a local folder is loaded as when its model_index.json names them: the class it was saved as, not
# AutoPipelineForText2Image's pick for its family.
DIT_PIPELINES = ("FluxPipeline", "FluxKontextPipeline", "StableDiffusion3Pipeline")


def model_class(folder: Path) -> str | None:
    """The pipeline class a model folder's ``model_index.json`` names (``_class_name``), or None."""
    path = folder / "model_index.json"
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise ComposerError(f"{path}: cannot read the model index ({one_line(exc)})") from None
    return name if isinstance(name, str) else None


def _takes(pipe, name: str) -> bool:
    return name in inspect.signature(type(pipe).__call__).parameters


def pipeline_guidance(pipe) -> float:
    """A DiT pipeline's own default guidance (FLUX.1-dev's distilled 3.5, SD3's 7); 7.5 for UNet pipelines."""
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        default = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
        if default is not None and isinstance(default.default, (int, float)):
            return float(default.default)
    return DEFAULT_GUIDANCE


class ComposerPipeline:
    """Compose LoRAs inside a diffusers pipeline (SD1.5, SDXL, FLUX.1 with Kontext, SD3).

    >>> pipe = ComposerPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", library="~/loras")
    >>> image = pipe("a castle <lora:ink-style:0.8>", loras=[("pixel-art", 0.5)], seed=1)[0]
    """

    def __init__(self, pipe, library: str | os.PathLike | None = None, model: str = ""):
        self.pipe = pipe
        self.library = Path(library).expanduser() if library else None
        model = model or getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""
        defaults = model_defaults(model)
        # a model folder that names itself (the mini world) is recorded by that name: its PNGs re-render
        # with --from-image on any install
        self.model = str(defaults.get("name") or model)
        self.default_guidance = float(defaults.get("guidance_scale", pipeline_guidance(pipe)))  # when a call gives none
        # the mini world whose recorded runs --strategy auto picks from ("" for any other model)
        self.world = str(defaults.get("world", ""))
        # what a DoRA file's weight other than 1 means: "comfy" (ComfyUI's, default) or "peft" (diffusers'/PEFT's)
        self.dora_scaling = "comfy"
        self._embeddings: dict[str, dict[str, list[str]]] = {}  # adapter name -> tokens its bundled embeddings added
        self.last_auto = ""  # why --strategy auto picked what it did in the last call
        self.runtime = LoraRuntime(pipe)
        self._files: dict[str, tuple] = {}  # adapter name -> (resolved path, size, mtime)
        self.adapter_loader = load_adapter  # (path, name=, allow_pickle=) -> Adapter; a server puts a cache here
        self.last_record: GenerationRecord | None = None
        self.last_driver: DenoiserDriver | None = None
        self.last_retrieval: list = []  # loras="auto": the retriever's matches (score, signals, reason)

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, library=None, torch_dtype=None, device=None, **kwargs):
        """Load a diffusers model folder or Hub id (``AutoPipelineForText2Image``) and wrap it; a local folder
        saved from a DiT pipeline (:data:`DIT_PIPELINES`) loads as the class its ``model_index.json`` names."""
        import diffusers
        from diffusers import AutoPipelineForText2Image

        model = os.fspath(model)
        local = Path(model).expanduser()
        if local.exists() and not (local / "model_index.json").is_file():
            raise ComposerError(f"{local}: not a diffusers model folder (no model_index.json)")
        name = model_class(local) if local.exists() else None
        loader = getattr(diffusers, name) if name in DIT_PIPELINES else AutoPipelineForText2Image
        if torch_dtype is not None:  # diffusers >= 0.42 names it ``dtype`` (``torch_dtype`` warns); older ones not
            from diffusers.pipelines import pipeline_utils

            kwargs["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = torch_dtype
        try:
            pipe = loader.from_pretrained(str(local) if local.exists() else model, **kwargs)
        except OSError as exc:
            raise ComposerError(f"{model}: cannot load model ({one_line(exc)})") from None
        if device is not None:
            pipe.to(device)
        return cls(pipe, library=library, model=model)

    # -- adapters --------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, Adapter]:
        return dict(self.runtime.adapters)

    def load_lora(self, ref: str | os.PathLike, name: str | None = None, allow_pickle: bool = False) -> Adapter:
        """Attach the LoRA file or library name ``ref`` (once: a file already attached is reused)."""
        path = resolve_lora(ref, self.library).resolve()
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        for attached, known in self._files.items():
            if known == key and (name is None or name == attached):
                return self.runtime.adapters[attached]
            if known[0] == key[0] and (name is None or name == attached):
                self.unload_lora(attached)  # the file changed on disk: load it again
                break
        name = name or self._free_name(lora_name(path))
        if self.dora_scaling == "comfy":  # the loader's default (a server's cache loader takes no other)
            adapter = self.adapter_loader(path, name=name, allow_pickle=allow_pickle)
        else:
            adapter = load_adapter(path, name=name, allow_pickle=allow_pickle, dora_scaling=self.dora_scaling)
        self.runtime.add(adapter)
        try:  # A1111's bundled embeddings (bundle_emb.*) join the tokenizer while the LoRA is loaded
            self._embeddings[adapter.name] = attach_embeddings(self.pipe, adapter.embeddings, str(path))
        except ComposerError:
            self.runtime.remove(adapter.name)
            raise
        self._files[adapter.name] = key
        return adapter

    def _free_name(self, stem: str) -> str:
        name, n = stem, 1
        while name in self.runtime.adapters:
            n += 1
            name = f"{stem}-{n}"
        return name

    def unload_lora(self, name: str) -> None:
        self.runtime.remove(name)
        detach_embeddings(self.pipe, self._embeddings.pop(name, {}))
        self._files.pop(name, None)

    def unload_all(self) -> None:
        """Detach every adapter: the wrapped pipeline is exactly the base model again."""
        self.runtime.clear()
        for added in self._embeddings.values():
            detach_embeddings(self.pipe, added)
        self._embeddings.clear()
        self._files.clear()

    # -- limits ----------------------------------------------------------------------------------
    BUDGET_STEPS = 50  # the pixel x step budget: 4x the native size per side at this many steps

    def size_rules(self) -> tuple[int, tuple[int, int] | None]:
        """``(multiple, native (height, width))``: what the pipeline itself accepts (diffusers' Stable Diffusion
        pipelines: multiples of 8 pixels, and of the VAE scale factor; a UNet pads latents that its
        downsampling does not divide, so 600x600 works on SD1.5 as in A1111; a transformer packs
        ``patch_size`` latents, so multiples of VAE x patch); the native size is the default one (``None``
        if unknown)."""
        unet = getattr(self.pipe, "unet", None)
        denoiser = unet if unet is not None else getattr(self.pipe, "transformer", None)
        config = getattr(denoiser, "config", None)
        vae = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        if unet is not None:
            return max(vae, 8), native_size(self.pipe, config, vae)
        patch = max(int(getattr(config, "patch_size", 2) or 2), 2)  # Flux: 2x2 whatever its config says
        return vae * patch, native_size(self.pipe, config, vae)

    def check_size(self, height=None, width=None, steps: int = 20, images: int = 1, limits: bool = True) -> None:
        """Refuse, in one line, a size this model cannot render (not a multiple of :meth:`size_rules`) and,
        unless ``limits=False``, pixels x steps x images above the budget: 4x the native size per side at
        :attr:`BUDGET_STEPS` steps (such renders are slow and may run out of memory)."""
        multiple, native = self.size_rules()
        for key, value in (("width", width), ("height", height)):
            if value is None:
                continue
            value = int(value)
            if value < 1:
                raise ComposerError(f"{key}={value}: must be a positive multiple of {multiple} for this model")
            if value % multiple:
                lower = value // multiple * multiple
                near = f"{lower} or {lower + multiple}" if lower else f"{multiple} or more"
                raise ComposerError(f"{key}={value}: must be a multiple of {multiple} for this model ({near})")
        if not limits or native is None:
            return
        h, w = int(height or native[0]), int(width or native[1])
        bh, bw = 4 * native[0], 4 * native[1]
        ratio = h * w * int(steps) * int(images) / (bh * bw * self.BUDGET_STEPS)
        if ratio > 1:
            times = f"{int(ratio * 10 + 0.99) / 10:g}x" if ratio < 10 else f"{round(ratio)}x"  # never "1x"
            many = f" x {int(images)} images" if int(images) > 1 else ""
            raise ComposerError(
                f"{w}x{h} at {int(steps)} steps{many} is {times} this model's budget of {bw}x{bh} at "
                f"{self.BUDGET_STEPS} steps (4x its native {native[1]}x{native[0]} per side; larger renders are "
                "slow and may run out of memory): pass limits=False to render anyway"
            )

    # -- generation ------------------------------------------------------------------------------
    def choose_loras(self, prompt: str, top_k: int | None = None, min_score: float | None = None) -> list:
        """``loras="auto"``: the library's adapters of this pipeline's family that the prompt names, by coverage
        (:mod:`retriever.selection`): at most ``top_k`` (default 4, a cap, not a target), each claim at its
        kind's calibrated threshold, or at ``min_score`` for every kind when given. Returns ``[(path, weight)]``;
        ``last_retrieval`` keeps the :class:`~lora_composer.retriever.Selection` (each pick's span and reason,
        ``left_out``, and ``notice``: what the cap dropped, None when nothing; ``compose`` prints it)."""
        if self.library is None:
            raise ComposerError('loras="auto" needs a LoRA library (library=DIR, --library DIR)')
        from lora_composer.retriever import DEFAULT_TOP_K, retriever_for

        if self.runtime.adapters:  # encode the prompt with the base text encoder
            self.runtime.set_weights(text={})
        found = retriever_for(self.pipe, self.library, family=self.runtime.family).select(
            prompt, top_k=DEFAULT_TOP_K if top_k is None else int(top_k), min_score=min_score
        )
        self.last_retrieval = found  # found.notice: a concept the prompt names that the cap dropped
        return [(m.path, m.weight) for m in found]

    def _attach(self, refs: list[LoraRef], allow_pickle: bool) -> list[tuple[Adapter, LoraRef]]:
        """Attach every requested adapter or none: on failure, those attached here are detached."""
        before = set(self.runtime.adapters)
        chosen = []
        try:
            for ref in refs:
                chosen.append((self.load_lora(ref.name, allow_pickle=allow_pickle), ref))
        except BaseException:
            for name in set(self.runtime.adapters) - before:
                self.unload_lora(name)
            raise
        return chosen

    def _attach_derived(self, strat) -> tuple[dict[str, Adapter], dict]:
        """Attach ``strat.derived_adapters()`` (:meth:`Strategy.derived_adapters`) for one call: each takes its
        original's weights, the original gets 0. All or none are attached. Returns them by original,
        and the weights to set back once they are detached."""
        derived = dict(strat.derived_adapters() or {})
        text, unet = self.runtime.text_mix.weights[0], self.runtime.denoiser_mix.weights[0]
        before = {
            "unet": {n: float(unet[s]) for n, s in self.runtime.slots.items()},
            "text": {n: float(text[s]) for n, s in self.runtime.slots.items()},
        }
        added = []
        try:
            for ad in derived.values():
                self.runtime.add(ad)
                added.append(ad.name)
        except BaseException:
            for name in added:
                self.runtime.remove(name)
            raise
        if derived:  # (fusing folds these weights)
            weights = {k: dict(v) for k, v in before.items()}
            for orig, ad in derived.items():
                for w in weights.values():
                    w[ad.name], w[orig] = w.get(orig, 0.0), 0.0
            self.runtime.set_weights(**weights)
        return derived, before

    def _choose_per_region(self, common: str, parts: list, top_k, min_score) -> list:
        """``loras="auto"`` with regions: each region's LoRAs chosen from its own text (the common text first) and
        added to the ones tagged in it; ``last_retrieval`` holds every region's picks, one entry per file."""
        from lora_composer.retriever.selection import Selection

        out, picks, left_out, dropped, cap = [], {}, [], [], 0
        for text, refs in parts:
            found = self.choose_loras(", ".join(p for p in (common, text) if p), top_k, min_score)
            sel = self.last_retrieval
            picks.update((m.path, m) for m in sel)
            left_out, dropped, cap = left_out + sel.left_out, dropped + sel.dropped, sel.top_k
            out.append((text, refs + [LoraRef(str(path), w, w) for path, w in found]))
        self.last_retrieval = Selection(picks.values(), left_out, dropped, cap)
        return out

    def _region(
        self,
        common: str,
        text: str,
        pairs,
        cfg: bool,
        negative_prompt: str | None,
        append_trigger_words: bool = False,
        clip_skip=None,
    ) -> Region:
        """One region of a regional prompt: the common text, its own and (when asked) its adapters' trigger words,
        encoded with only its adapters' text-encoder layers, as is the negative prompt (``pairs``: its
        ``(Adapter, LoraRef)``); the caller restores the text-encoder weights."""
        if getattr(self.pipe, "unet", None) is None:
            raise ComposerError(
                f"strategy 'regional' runs on UNet pipelines (Stable Diffusion 1.x/2.x, SDXL), not on "
                f"{type(self.pipe).__name__}: use another strategy there"
            )
        text = ", ".join(p for p in (common, text) if p)
        if append_trigger_words:
            words = dict.fromkeys(
                w for a, _ in pairs for w in a.metadata.trigger_words if w.lower() not in text.lower()
            )
            text = ", ".join([text, *words]) if words else text
        device = getattr(self.pipe, "_execution_device", None) or torch.device("cpu")
        self.runtime.set_weights(text={a.name: r.te_weight for a, r in pairs})
        with torch.no_grad():
            out = self.pipe.encode_prompt(
                text,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=negative_prompt,
                clip_skip=clip_skip,
            )
        embeds = {"positive": out[0], "negative": out[1]}
        if len(out) == 4:  # SDXL: the pooled embeddings too
            embeds.update(pooled_positive=out[2], pooled_negative=out[3])
        return Region(text, {a.name: r.unet_weight for a, r in pairs}, embeds)

    @staticmethod
    def _text_inputs(prompt: str, negative_prompt: str | None, regions: list[Region]) -> dict:
        """The pipe's text inputs: the prompt, or with regions the first region's embeddings (every row group
        replaces them with its own), so the whole regional text is not encoded (and truncated) once more."""
        if not regions:
            return {"prompt": prompt, "negative_prompt": negative_prompt}
        e = regions[0].embeds
        out = {"prompt_embeds": e["positive"], "negative_prompt_embeds": e["negative"]}
        if "pooled_positive" in e:
            out.update(pooled_prompt_embeds=e["pooled_positive"], negative_pooled_prompt_embeds=e["pooled_negative"])
        return out

    def render_core(self, pipe_kwargs: dict | None = None):
        """The family render (:mod:`lora_composer.render`) that runs a call with these extra keyword arguments,
        or None where the diffusers pipeline's own ``__call__`` runs it: a pipeline with no family there
        (image-to-image, UNets with timestep conditioning...), Kontext with an input image, FLUX's true CFG,
        IP-Adapter images, preset latents or timesteps, ``guidance_rescale``, callbacks that edit the pipeline's
        state (``PipelineCallback``) or read more than the latents, ``output_type="latent"``, or any argument
        the core does not take."""
        render = render_for(self.pipe)
        return render if render is not None and render.covers(dict(pipe_kwargs or {})) else None

    def _render(
        self, render, text: dict, steps: int, guidance: float, height, width, images: int, generator, pipe_kwargs: dict
    ):
        """One call through the render core; the denoiser's calls go through the driver's hook as they would
        from the pipeline's own loop."""
        kwargs = dict(pipe_kwargs)
        common = {
            "output_type": kwargs.pop("output_type", "pil") or "pil",
            "callback": kwargs.pop("callback_on_step_end", None),
            "callback_inputs": tuple(kwargs.pop("callback_on_step_end_tensor_inputs", None) or ("latents",)),
        }
        text = dict(text)
        prompt, negative = text.pop("prompt", None), text.pop("negative_prompt", None)
        with torch.no_grad():
            return render.render(
                steps=steps,
                guidance=guidance,
                height=height,
                width=width,
                generator=generator,
                images=images,
                prompt=prompt,
                negative_prompt=negative,
                text=text,
                **common,
                **kwargs,
            )

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        loras=(),
        strategy="merge",
        strategy_args: dict | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        append_trigger_words: bool = False,
        fuse: bool | str = False,
        max_batch: int | None = None,
        progress: bool = True,
        allow_pickle: bool = False,
        callback=None,
        top_k: int | None = None,
        min_score: float | None = None,
        limits: bool = True,
        **pipe_kwargs,
    ):
        """Render ``prompt`` with ``loras`` composed by ``strategy``; returns a list of PIL images.

        ``loras`` items: ``path_or_name``, ``(path_or_name, weight)`` or ``(path_or_name, te, unet)``;
        ``<lora:name:w>`` tags in the prompt are added to them and removed from the text. Each image's
        ``info`` holds its generation parameters (A1111 ``parameters`` and a ``lora-composer`` JSON).
        ``fuse=True`` folds static weights into the base weights for the call (restored exactly after);
        ``fuse="auto"`` does so when that costs less than the per-step path for this call's steps.
        ``loras="auto"`` lets the retriever choose the adapters the prompt names from the library's catalog,
        at most ``top_k`` (4), each above its calibrated per-kind threshold (``min_score``: one floor for
        all); why, and what the cap dropped, is in ``last_retrieval`` (:meth:`choose_loras`).
        ``max_batch`` caps the rows of one denoiser pass when a strategy runs several row groups.
        ``guidance_scale`` defaults to the model's (:attr:`default_guidance`). Sizes must be multiples of the
        model's (:meth:`check_size`); ``limits=False`` lifts the pixel x step budget.
        Non-finite latents (an extreme LoRA weight) raise :class:`ComposerError` at the step they appear.

        The loop is the render core's (:meth:`render_core`, one place for SD1.5, SDXL, FLUX.1 and SD3, shared
        with the server); a call the core does not cover (see :meth:`render_core`: Kontext with an input image,
        true CFG, IP-Adapter, other pipeline arguments) runs the diffusers pipeline's own ``__call__``, the
        strategy's row groups driven through the same denoiser hook either way.
        """
        if (height is None) != (width is None):  # diffusers would reset both to the model's size: only the other is
            native = self.size_rules()[1]
            if native is not None:
                height, width = height or native[0], width or native[1]
        self.check_size(height, width, num_inference_steps, num_images_per_prompt, limits=limits)
        if height and width and "max_area" not in pipe_kwargs and _takes(self.pipe, "max_area"):
            pipe_kwargs["max_area"] = int(height) * int(width)  # Kontext rescales any size to max_area (1 MP)
        if guidance_scale is None:
            guidance_scale = self.default_guidance
        if not math.isfinite(float(guidance_scale)):
            raise ComposerError(f"guidance_scale={guidance_scale}: must be a finite number")
        if seed is not None and not 0 <= int(seed) <= MAX_SEED:
            raise ComposerError(f"seed={seed}: must be between 0 and {MAX_SEED}")
        start = time.perf_counter()
        auto = strategy == AUTO
        if auto:  # regions decide now; otherwise merge until the LoRAs are known (below)
            if strategy_args:
                raise ComposerError("strategy 'auto' takes no arguments: it picks a strategy with its defaults")
            strategy = "regional" if len(split_regions(prompt)[1]) > 1 else "merge"
        strat = get_strategy(strategy, **(strategy_args or {}))
        if strat.regional:  # "COMMON ADDCOMM A <lora:x> BREAK B": tags in a region act in it only
            common, texts = split_regions(prompt)
            clean_common, tag_refs = parse_prompt(common)
            parts = [parse_prompt(text) for text in texts]
            clean_prompt = " BREAK ".join(text for text, _ in parts)
            clean_prompt = f"{clean_common} ADDCOMM {clean_prompt}" if clean_common else clean_prompt
        else:
            clean_prompt, tag_refs = parse_prompt(prompt)
        self.last_retrieval = []
        if isinstance(loras, str) and loras == "auto" and strat.regional:  # each region picks from its own text
            parts, loras = self._choose_per_region(clean_common, parts, top_k, min_score), ()
        elif isinstance(loras, str) and loras == "auto":  # top_k/min_score: see choose_loras
            loras = self.choose_loras(clean_prompt, top_k, min_score)
        refs = [_as_ref(item) for item in loras] + tag_refs
        region_refs = [r for _, rs in parts for r in rs] if strat.regional else []
        if auto:  # the best measured for this many LoRAs in the model's world (lora_composer.measured)
            name, self.last_auto = resolve_auto(prompt, len({r.name for r in refs + region_refs}), self.world)
            strat = get_strategy(name) if name != strat.name else strat
        if negative_prompt and float(pipe_kwargs.get("true_cfg_scale") or 1) > 1 and not strat.static:
            # FLUX's true CFG: two transformer calls per step, which a per-step plan (and its cache) would take for two
            raise ComposerError(
                f"strategy '{strat.name}' cannot run with true CFG (negative_prompt and "
                "true_cfg_scale > 1): the transformer runs twice per step there; use merge, "
                "or leave true_cfg_scale at 1"
            )
        chosen = self._attach(refs + region_refs, allow_pickle)

        # Several requests for one file: the last one wins (as in A1111, one network per name).
        by_name: dict[str, tuple[Adapter, LoraRef]] = {a.name: (a, r) for a, r in chosen}
        names = list(by_name)
        self.runtime.set_weights(
            unet={n: r.unet_weight for n, (a, r) in by_name.items()},
            text={n: r.te_weight for n, (a, r) in by_name.items()},
        )
        if append_trigger_words and not strat.regional:
            words = [w for a, _ in by_name.values() for w in a.metadata.trigger_words]
            words = [w for w in dict.fromkeys(words) if w.lower() not in clean_prompt.lower()]
            if words:
                clean_prompt = ", ".join([p for p in [clean_prompt, *words] if p])

        # NaN/inf latents would decode to a black image: stop at the step they appear, naming the likely cause
        theirs = pipe_kwargs.get("callback_on_step_end")
        if "latents" in getattr(self.pipe, "_callback_tensor_inputs", ()) and not hasattr(theirs, "tensor_inputs"):

            def check_finite(pipe, step, timestep, kwargs, _theirs=theirs):
                latents = kwargs.get("latents")
                if torch.is_tensor(latents) and not bool(torch.isfinite(latents).all()):
                    weights = [(max((r.te_weight, r.unet_weight), key=abs), n) for n, (_, r) in by_name.items()]
                    heaviest = max(weights, key=lambda wn: abs(wn[0]), default=(0.0, ""))
                    cause = (
                        f"the LoRA weights are the likely cause (the largest: {heaviest[1]} at {heaviest[0]:g}; "
                        "usual weights are between -2 and 2)"
                        if abs(heaviest[0]) > 2
                        else f"likely causes: the model in {latents.dtype}, guidance scale {guidance_scale:g}"
                        + (f", the LoRAs {', '.join(by_name)}" if by_name else "")
                    )
                    raise ComposerError(
                        f"non-finite values (NaN/inf) at step {step + 1} of {num_inference_steps}, "
                        f"no image produced: {cause}"
                    )
                return _theirs(pipe, step, timestep, kwargs) if _theirs is not None else kwargs

            pipe_kwargs["callback_on_step_end"] = check_finite

        seed = random.randrange(2**32) if seed is None else int(seed)
        device = getattr(self.pipe, "_execution_device", None) or torch.device("cpu")
        generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(seed)
        context = StrategyContext.from_pipeline(self.pipe, self.runtime, [by_name[n][0] for n in names], guidance_scale)
        if strat.regional:
            shared, own = chosen[: len(refs)], chosen[len(refs) :]
            for text, rs in parts:  # each region: the shared adapters, then its own (in the order attached)
                mine, own = own[: len(rs)], own[len(rs) :]
                context.regions.append(
                    self._region(
                        clean_common,
                        text,
                        shared + mine,
                        bool(context.cfg),
                        negative_prompt,
                        append_trigger_words,
                        pipe_kwargs.get("clip_skip"),
                    )
                )
            self.runtime.set_weights(text={n: r.te_weight for n, (a, r) in by_name.items()})
        try:
            strat.begin(names, [by_name[n][1].unet_weight for n in names], num_inference_steps, context)
        except ComposerError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ComposerError(f"strategy '{strat.name}': {one_line(exc)}") from None
        mask = strat.text_mask()
        if mask is not None:
            self.runtime.set_weights(text={n: by_name[n][1].te_weight * float(m) for n, m in zip(names, mask)})

        denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer")
        self.pipe.set_progress_bar_config(disable=not progress, desc="denoising", leave=False)
        if fuse == "auto":  # fold when that costs less than the low-rank path over this call's steps
            rows = (2 if guidance_scale > 1 else 1) * int(num_images_per_prompt)
            native = self.size_rules()[1] or (512, 512)
            pixels = int(height or native[0]) * int(width or native[1])
            # a layer not run yet counts the positions of a UNet's deepest level (1/64 of the latent's)
            fuse = self.runtime.fuse_saves(num_inference_steps, rows, tokens=max(1, pixels // 4096))
        fused = fuse and strat.static and bool(names)
        render = self.render_core(pipe_kwargs)
        derived, weights_before = self._attach_derived(strat)
        try:
            if fused:
                self.runtime.fuse()
            driven = [derived[n].name if n in derived else n for n in names]
            text = self._text_inputs(clean_prompt, negative_prompt, context.regions)
            with (
                DenoiserDriver(self.runtime, denoiser, strat, driven, max_batch=max_batch) as driver,
                strat.patched(denoiser),
                _truncation_in_one_line(),
            ):
                if render is not None:
                    images = self._render(
                        render,
                        text,
                        num_inference_steps,
                        guidance_scale,
                        height,
                        width,
                        num_images_per_prompt,
                        generator,
                        pipe_kwargs,
                    )
                else:
                    images = self.pipe(
                        **text,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        height=height,
                        width=width,
                        num_images_per_prompt=num_images_per_prompt,
                        generator=generator,
                        **pipe_kwargs,
                    ).images
        finally:
            if fused:
                self.runtime.unfuse()
            for ad in derived.values():  # a strategy's derived adapters act for this call only
                self.runtime.remove(ad.name)
            if derived:
                self.runtime.set_weights(**weights_before)
        self.last_driver = driver
        if hasattr(images, "shape"):  # output_type="np" or "pt": [batch, h, w, c] / [batch, c, h, w]
            size = images.shape[1:3] if images.shape[-1] in (1, 3, 4) else images.shape[2:4]
        else:
            size = (images[0].height, images[0].width) if len(images) else (height, width)
        record = generation_record(
            self.model,
            prompt=clean_prompt,
            negative_prompt=negative_prompt,
            steps=num_inference_steps,
            guidance=guidance_scale,
            seed=seed,
            size=size,
            strategy=strat.name,
            strategy_args={**(strategy_args or {}), **strat.describe()},
            loras=[(a, r.te_weight, r.unet_weight) for a, r in by_name.values()],
            scheduler=self.pipe.scheduler,
            elapsed_s=time.perf_counter() - start,
        )
        self.last_record = record
        for image in images:
            if hasattr(image, "info"):
                image.info["parameters"] = record.to_a1111()
                image.info["lora-composer"] = record.to_json()
        return images
