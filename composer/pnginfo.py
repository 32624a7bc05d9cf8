"""What made an image, stored in the PNG itself.

Two text chunks: ``parameters`` in AUTOMATIC1111's format (so A1111, Civitai and image browsers show the
prompt, the settings and the ``Lora hashes``), and ``lora-composer`` with the full record as JSON, which
``compose --from-image`` reads back to render the same image again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lora_composer.errors import ComposerError, one_line
from lora_composer.prompt_syntax import find_tags, format_lora_tag, format_weight

PARAMETERS_KEY = "parameters"
RECORD_KEY = "lora-composer"


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("lora-composer")
    except (ImportError, PackageNotFoundError):
        return "0.1.0"


VERSION = f"lora-composer {_package_version()}"

# diffusers scheduler class -> the sampler name A1111 users know.
_SAMPLER_NAMES = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ 2S",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "DEISMultistepScheduler": "DEIS",
    "LCMScheduler": "LCM",
    "TCDScheduler": "TCD",
}


def sampler_name(scheduler) -> str:
    """A1111's name for a diffusers scheduler (instance, class or class name); the class name otherwise."""
    if not isinstance(scheduler, str):
        scheduler = scheduler.__name__ if isinstance(scheduler, type) else type(scheduler).__name__
    return _SAMPLER_NAMES.get(scheduler, scheduler)


def _quote(text: str) -> str:
    """A1111's ``quote``: values holding ``,``, ``:`` or a newline are written as JSON strings."""
    text = str(text)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


@dataclass
class GenerationRecord:
    """Everything needed to render an image again.

    ``loras`` holds one dict per adapter applied: ``{"name", "path", "te_weight", "unet_weight",
    "hash"}`` where ``hash`` is A1111's short hash (first 12 hex digits of the file's sha256).
    ``sampler`` is the A1111 name (``DDIM``), ``scheduler`` the diffusers class name.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    strategy: str = "merge"
    strategy_args: dict = field(default_factory=dict)
    model: str = ""
    model_hash: str | None = None
    loras: list[dict] = field(default_factory=list)
    sampler: str = ""
    scheduler: str = ""
    version: str = VERSION
    elapsed_s: float | None = None

    # -- A1111 text -------------------------------------------------------------------------------
    def prompt_with_tags(self) -> str:
        """The prompt with a ``<lora:name:w>`` tag for every adapter not already tagged in it."""
        tagged = {n.lower() for n in find_tags(self.prompt)}
        tags = [
            format_lora_tag(lo["name"], lo.get("te_weight", 1.0), lo.get("unet_weight", lo.get("te_weight", 1.0)))
            for lo in self.loras
            if str(lo.get("name", "")).lower() not in tagged
        ]
        return " ".join([p for p in [self.prompt.strip(), *tags] if p])

    def _model_name(self) -> str:
        model = str(self.model)
        if not model:
            return ""
        p = Path(model)
        if p.is_absolute() or model.startswith(".") or p.exists():
            return p.stem if p.suffix in (".safetensors", ".ckpt") else p.name  # a single-file checkpoint
        return model  # a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5

    def to_a1111(self) -> str:
        """AUTOMATIC1111's ``parameters`` text: prompt, ``Negative prompt:`` line, then the settings."""
        items: list[tuple[str, object]] = [("Steps", self.steps)]
        sampler = self.sampler or (sampler_name(self.scheduler) if self.scheduler else "")
        if sampler:
            items.append(("Sampler", sampler))
        items.append(("CFG scale", format_weight(self.guidance_scale)))
        if self.seed is not None:
            items.append(("Seed", self.seed))
        if self.width and self.height:
            items.append(("Size", f"{self.width}x{self.height}"))
        if self.model_hash:
            items.append(("Model hash", self.model_hash))
        if self.model:
            items.append(("Model", self._model_name()))
        if self.strategy and self.strategy != "merge":
            items.append(("Lora strategy", self.strategy))
        hashes = [f"{lo['name']}: {lo['hash']}" for lo in self.loras if lo.get("hash")]
        if hashes:
            items.append(("Lora hashes", ", ".join(hashes)))
        if self.version:
            items.append(("Version", self.version))
        lines = [self.prompt_with_tags()]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in items))
        return "\n".join(lines)

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationRecord":
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or "prompt" not in data:
            raise ValueError("not a lora-composer generation record")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "GenerationRecord":
        return cls.from_dict(json.loads(text))


def png_info(record: GenerationRecord):
    """The PIL ``PngInfo`` holding both chunks (for callers that save images themselves)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, record.to_a1111())
    info.add_text(RECORD_KEY, record.to_json())
    return info


def save_png(image, path: str | os.PathLike, record: GenerationRecord) -> Path:
    """Save ``image`` as PNG at ``path`` with the ``parameters`` and ``lora-composer`` text chunks."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_info(record))
    return path


def read_texts(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG file; one-line :class:`ComposerError` if it is missing or not a PNG."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ComposerError(f"{path}: no such file")
    if path.is_dir():
        raise ComposerError(f"{path}: is a folder, not a PNG image")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ComposerError(f"{path}: not a PNG image ({im.format})")
            return dict(getattr(im, "text", {}) or {})
    except (UnidentifiedImageError, SyntaxError, OSError, ValueError) as exc:
        raise ComposerError(f"{path}: not a readable PNG image ({type(exc).__name__})") from None


def read_record(path: str | os.PathLike) -> GenerationRecord:
    """The :class:`GenerationRecord` stored in a PNG written by lora-composer."""
    texts = read_texts(path)
    raw = texts.get(RECORD_KEY)
    if raw is None:
        extra = " (it has A1111 parameters only)" if PARAMETERS_KEY in texts else ""
        raise ComposerError(f"{path}: no lora-composer metadata in this PNG{extra}")
    try:
        return GenerationRecord.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise ComposerError(f"{path}: damaged lora-composer metadata ({one_line(exc)})") from None
