"""What a client may ask for, checked before anything is queued: every refusal is one line naming the field.

LoRAs are named as the web UI names them: a path relative to the library (``styles/ink.safetensors``) or a
bare file name; absolute paths, ``..`` and symlinks that leave the library are refused, so a client can
only ever make the server read the library's own files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_composer.errors import ComposerError, one_line
from lora_composer.fusion.registry import AUTO, resolve_auto
from lora_composer.library import list_loras, lora_name, lora_stem
from lora_composer.prompt_syntax import parse_prompt, with_tag_names
from lora_composer.serving.jobs import RenderSpec


class RequestError(ComposerError, ValueError):
    """A request the server will not run: ``field`` and one line of why (HTTP 4xx)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


class LoraItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=512, description="a LoRA of the library: its name or relative path")
    weight: float = Field(
        1.0, ge=-10, le=10, description="strength (the denoiser's, and the text encoder's unless te_weight is given)"
    )
    te_weight: float | None = Field(None, ge=-10, le=10, description="the text encoder's strength, if not weight")


class GenerateBody(BaseModel):
    """``POST /v1/generate`` and ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=4000, description="the prompt; <lora:name:w> tags are read as in the CLI")
    negative_prompt: str = Field("", max_length=4000)
    loras: list[LoraItem] | Literal["auto"] = Field(
        default_factory=list, description='[{"name", "weight"}] or "auto" (the retriever picks from the prompt)'
    )
    strategy: str = Field(
        "merge",
        max_length=64,
        description="auto, merge, composite, switch...: all share denoiser batches "
        "but ties, dare, klora, tsv and activation-matched, which run alone",
    )
    strategy_args: dict[str, float | int | str | bool] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, lt=2**32, description="random (and returned in the PNG) when omitted")
    steps: int | None = Field(None, ge=1, description="denoising steps")
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    guidance: float | None = Field(None, ge=0, le=50, description="classifier-free guidance scale")
    scheduler: str = Field("", max_length=64, description="a diffusers scheduler class name; empty: the model's")


@dataclass
class Limits:
    max_steps: int = 50
    max_pixels: int = 1024 * 1024
    max_loras: int = 8
    default_steps: int = 20


class LibraryNames:
    """LoRA names -> files, confined to the library (the web UI's rule)."""

    def __init__(self, library: Path):
        self.library = Path(library).expanduser().resolve()

    def files(self) -> dict[str, Path]:
        out = {}
        for path in list_loras(self.library):
            real = path.resolve()
            if real.is_file() and real.is_relative_to(self.library):
                out.setdefault(path.relative_to(self.library).as_posix(), real)
        return out

    def path(self, name: str, field: str) -> Path:
        text = (name or "").strip()
        files = self.files()
        if text in files:
            return files[text]
        if "/" not in text and "\\" not in text and not text.startswith("~"):
            stem = lora_stem(text).lower()
            hits = [p for rel, p in files.items() if lora_name(rel).lower() == stem]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise RequestError(field, f"LoRA name {text!r} is ambiguous in the library: give its relative path")
        raise RequestError(field, f"LoRA {text!r} is not in the library (GET /v1/loras lists them)")


def to_spec(body: GenerateBody, names: LibraryNames, limits: Limits, composer, strategies: set[str]) -> RenderSpec:
    """Check ``body`` against the model, the library and the limits; raise :class:`RequestError` or return the spec."""
    if not body.prompt.strip():
        raise RequestError("prompt", "must not be empty")
    clean, tags = parse_prompt(body.prompt) if "<" in body.prompt else (body.prompt, [])
    strategy = body.strategy
    if strategy == AUTO:  # chosen here, so the queue batches by the strategy that runs and the record names it
        if body.strategy_args:
            raise RequestError("strategy_args", "auto takes no arguments (it picks a strategy with its defaults)")
        named = {item.name for item in body.loras} if not isinstance(body.loras, str) else set()
        try:
            strategy, _ = resolve_auto(
                body.prompt, len(named | {tag.name for tag in tags}), getattr(composer, "world", "")
            )
        except ComposerError as exc:
            raise RequestError("prompt", one_line(exc)) from None
    if strategy not in strategies:
        raise RequestError("strategy", f"unknown strategy {body.strategy!r} (one of: {', '.join(sorted(strategies))})")
    regional = strategy == "regional"  # its tags stay in the prompt: each acts in its region
    if strategy == "merge" and body.strategy_args:
        raise RequestError("strategy_args", "merge takes no arguments")
    steps = limits.default_steps if body.steps is None else body.steps
    if steps > limits.max_steps:
        raise RequestError("steps", f"{steps} is above this server's limit of {limits.max_steps}")
    multiple, native = composer.size_rules()
    native = native or (512, 512)
    height, width = body.height or native[0], body.width or native[1]
    for field, value in (("width", width), ("height", height)):
        if value % multiple:
            raise RequestError(field, f"{value} must be a multiple of {multiple} for this model")
    if width * height > limits.max_pixels:
        raise RequestError("width", f"{width}x{height} is above this server's limit of {limits.max_pixels} pixels")
    text_weights: dict[str, float] = {}
    region_loras: list[Path] = []
    if isinstance(body.loras, str):
        loras = "auto"
        if tags:
            raise RequestError("loras", '"auto" cannot be combined with <lora:...> tags in the prompt')
        if regional:
            raise RequestError("loras", '"auto" is not served with regional yet: tag each region\'s LoRAs in it')
    else:
        loras = []
        for i, item in enumerate(body.loras):
            loras.append((names.path(item.name, f"loras[{i}].name"), item.weight))
            text_weights[str(loras[-1][0])] = item.weight if item.te_weight is None else item.te_weight
        if regional:  # the tags stay where they are, named by their files: each acts in its region
            region_loras = [names.path(tag.name, "prompt") for tag in tags]
            clean = with_tag_names(body.prompt, [str(p) for p in region_loras])
        else:
            for tag in tags:  # <lora:name:w> or <lora:name:te:unet>
                loras.append((names.path(tag.name, "prompt"), tag.unet_weight))
                text_weights[str(loras[-1][0])] = tag.te_weight
        count = len({str(p) for p, _ in loras} | {str(p) for p in region_loras})
        if count > limits.max_loras:
            raise RequestError("loras", f"{count} LoRAs is above this server's limit of {limits.max_loras}")
    guidance = composer.default_guidance if body.guidance is None else body.guidance
    seed = random.randrange(2**32) if body.seed is None else body.seed
    if body.scheduler and body.scheduler != type(composer.pipe.scheduler).__name__:
        known = {c.__name__ for c in getattr(composer.pipe.scheduler, "compatibles", [])}
        if body.scheduler not in known:
            raise RequestError("scheduler", f"{body.scheduler!r} is not a scheduler of this model")
    if text_weights:  # kept only where they differ from the denoiser's weight (the last one given wins)
        unet = {str(p): w for p, w in loras}
        text_weights = {path: w for path, w in text_weights.items() if w != unet[path]}
    return RenderSpec(
        prompt=clean.strip(),
        negative_prompt=body.negative_prompt,
        loras=loras,
        text_weights=text_weights,
        strategy=strategy,
        strategy_args=dict(body.strategy_args),
        seed=seed,
        steps=steps,
        width=width,
        height=height,
        guidance=float(guidance),
        scheduler=body.scheduler,
        region_loras=region_loras,
    )


def check_strategy_args(strategy: str, args: dict) -> None:
    """Build the strategy once to refuse bad arguments before queueing (one line naming the argument)."""
    from lora_composer.fusion import get_strategy

    try:
        get_strategy(strategy, **args)
    except (ComposerError, ValueError, TypeError) as exc:
        raise RequestError("strategy_args", one_line(exc)) from None
