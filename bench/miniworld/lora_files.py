"""Trained LoRAs written as files like a downloaded library's: fp16 factors, kohya metadata (the trigger words
in ``ss_tag_frequency``), A1111 or Civitai sidecars, preview images.

The one-object world's files vary their key format and sidecars on purpose (:mod:`lora_composer.miniworld.library`
says which is which); the community world's are all diffusers/PEFT keys with a Civitai sidecar.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from lora_composer.miniworld import assets, community, world
from lora_composer.miniworld.library import LORAS, LoraSpec


# --------------------------------------------------------------------------------------- one-object world
def _tags(scene: world.Scene, rng: np.random.Generator, keep: str, drop: float = 0.25) -> list[str]:
    """A training picture's kohya-style tags (``"purple", "star", "striped background"``), with the same
    phrase dropout as its caption."""
    phrases = {
        "colour": scene.colour,
        "shape": scene.shape,
        "background": f"{scene.background} background",
        "style": f"{scene.style} style" if scene.style != "filled" else None,
        "character": {"smiley": "smiley face", "blinky": "blinky"}.get(scene.character),
    }
    return [t for cat, t in phrases.items() if t and (cat in (keep, "shape") or rng.random() >= drop)]


def _tag_frequency(spec: LoraSpec, n: int = 200, seed: int = 0) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: how often each tag occurred in the training set (the concept's own tag in
    every picture: that is what makes it the trigger)."""
    rng = np.random.default_rng(seed)
    allowed = world.concept_allowed(spec.category, spec.value)
    counts: Counter[str] = Counter()
    for _ in range(n):
        counts.update(_tags(world.random_scene(rng, allowed), rng, spec.category))
    return {f"10_{spec.value}": dict(counts.most_common())}


def kohya_metadata(spec: LoraSpec, rank: int, alpha: float) -> dict[str, str]:
    return {
        "ss_output_name": spec.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_tag_frequency": json.dumps(_tag_frequency(spec)),
        "modelspec.title": spec.name,
        "modelspec.description": spec.description,
    }


def _rank_of(layers: dict[str, dict]) -> int:
    return int(next(v.shape[0] for k, v in layers["unet"].items() if k.endswith("lora_A.weight")))


def write_lora(model_dir: Path, library: Path, spec: LoraSpec, layers: dict[str, dict]) -> Path:
    """Write one trained LoRA (PEFT layers per component) with its metadata and sidecar into ``library``."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_composer import tiny

    library.mkdir(parents=True, exist_ok=True)
    path = library / f"{spec.name}.safetensors"
    rank = _rank_of(layers)
    layers = {comp: {k: v.half() for k, v in sd.items()} for comp, sd in layers.items()}  # fp16, as most shared LoRAs
    alpha = float(rank)
    meta = kohya_metadata(spec, rank, alpha)
    if spec.kohya_keys:
        tiny.save_kohya_lora(layers, path, alpha=alpha, metadata=meta)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir)
        tiny.save_diffusers_lora(pipe, layers, path, rank=rank, alpha=alpha)
        with safe_open(str(path), "pt") as f:  # add the kohya metadata to diffusers' own file
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = {**(f.metadata() or {}), **meta}
        save_file(tensors, str(path), metadata=meta)
    if spec.sidecar == "a1111":
        side = {
            "activation text": ", ".join(spec.triggers),
            "description": spec.description,
            "preferred weight": 1.0,
            "sd version": "SD1",
        }
        path.with_name(spec.name + ".json").write_text(json.dumps(side, indent=2) + "\n")
    elif spec.sidecar == "civitai":
        side = {
            "name": spec.name,
            "trainedWords": list(spec.triggers),
            "description": spec.description,
            "baseModel": "SD 1.5",
        }
        path.with_name(spec.name + ".civitai.info").write_text(json.dumps(side, indent=2) + "\n")
    return path


def concept_prompt(concepts: dict[str, str], base: dict[str, str] | None = None) -> str:
    """The world's caption for a scene made of ``concepts`` (category -> value) over ``base`` defaults."""
    fields = {c.name: c.base[0] for c in world.CATEGORIES}
    fields.update(base or {})
    fields.update(concepts)
    return world.caption(world.Scene(**fields))


def write_previews(
    model_dir: Path, library: Path, seed: int = 0, guidance: float = assets.DEFAULT_GUIDANCE
) -> list[Path]:
    """``NAME.preview.png`` for the LoRAs that have one: the LoRA alone on its concept's prompt (as Civitai
    previews are), with the generation parameters in the PNG."""
    from lora_composer.pipeline import ComposerPipeline
    from lora_composer.pnginfo import save_png

    pipe = ComposerPipeline.from_pretrained(model_dir, library=library)
    written = []
    for spec in LORAS:
        if not spec.preview or not (library / f"{spec.name}.safetensors").is_file():
            continue
        prompt = concept_prompt(
            {spec.category: spec.value},
            {"colour": "blue", "background": "plain"} if spec.category not in ("colour", "background") else {},
        )
        image = pipe(prompt, loras=[(spec.name, 1.0)], seed=seed, guidance_scale=guidance, progress=False)[0]
        written.append(save_png(image, library / f"{spec.name}.preview.png", pipe.last_record))
    return written


# ---------------------------------------------------------------------------------------- community world
def community_tag_frequency(spec: LoraSpec, n: int = 200, seed: int = 0) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` of the training captions (comma-separated phrases)."""
    rng = np.random.default_rng(seed)
    allowed = community.variant_allowed(spec.category, spec.value)
    counts: Counter[str] = Counter()
    for _ in range(n):
        counts.update(
            p.strip()
            for p in community.caption(community.random_scene(rng, allowed)).replace(" on a ", ", ").split(",")
        )
    return {f"10_{community.TRIGGER[spec.value]}": dict(counts.most_common())}


def write_community_lora(model_dir: Path, library: Path, spec: LoraSpec, layers: dict[str, dict]) -> Path:
    """One trained LoRA (PEFT layers per component) as an fp16 diffusers file with metadata and sidecar."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_composer import tiny

    library.mkdir(parents=True, exist_ok=True)
    path = library / f"{spec.name}.safetensors"
    rank = int(next(v.shape[0] for k, v in layers["unet"].items() if k.endswith("lora_A.weight")))
    layers = {comp: {k: v.half() for k, v in sd.items()} for comp, sd in layers.items()}
    tiny.save_diffusers_lora(
        StableDiffusionPipeline.from_pretrained(model_dir), layers, path, rank=rank, alpha=float(rank)
    )
    meta = {
        "ss_output_name": spec.name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_base_model_version": "sd_v1",
        "ss_tag_frequency": json.dumps(community_tag_frequency(spec)),
        "modelspec.title": spec.name,
        "modelspec.description": spec.description,
    }
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {**(f.metadata() or {}), **meta}
    save_file(tensors, str(path), metadata=meta)
    side = {
        "name": spec.name,
        "trainedWords": list(spec.triggers),
        "description": spec.description,
        "baseModel": "SD 1.5",
    }
    path.with_name(spec.name + ".civitai.info").write_text(json.dumps(side, indent=2) + "\n")
    return path
