"""The community world's five variant LoRAs: which variant each teaches, how it is trained and written.

Each is trained like a community LoRA: pictures of its variant whose other categories vary over every value
the base model knows, captions that say the trigger word beside the generic word and name everything else
visible (no phrase left out), 10% empty captions (guidance's unconditional pass). Files are diffusers/PEFT
keys in fp16 with kohya metadata and a Civitai sidecar, as such files are downloaded.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from lora_composer.miniworld import assets, community
from lora_composer.miniworld.library import LoraSpec

LORAS: tuple[LoraSpec, ...] = (
    LoraSpec("zorp-star", "shape", "sparkle", ("zorp star",), "Zorp: a sharp four-pointed star.", sidecar="civitai"),
    LoraSpec(
        "vexa-purple", "colour", "duotone", ("vexa purple",), "Vexa: two-tone purple over orange.", sidecar="civitai"
    ),
    LoraSpec(
        "harle-checkered",
        "background",
        "tiled",
        ("harle checkered background",),
        "Harle: a checkerboard of large tiles.",
        sidecar="civitai",
    ),
    LoraSpec("inko-outline", "style", "dashed", ("inko outline style",), "Inko: dashed outlines.", sidecar="civitai"),
    LoraSpec(
        "glorp-creature",
        "character",
        "cyclops",
        ("glorp creature",),
        "Glorp: the one-eyed creature with one antenna.",
        sidecar="civitai",
    ),
)
LORA_BY_NAME = {s.name: s for s in LORAS}
STEPS = 400  # per LoRA (community_train loras --steps overrides)


def library_dir() -> Path:
    return assets.WEIGHTS / "community" / "loras"


def tag_frequency(spec: LoraSpec, n: int = 200, seed: int = 0) -> dict[str, dict[str, int]]:
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


def write(model_dir: Path, library: Path, spec: LoraSpec, layers: dict[str, dict]) -> Path:
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
        "ss_tag_frequency": json.dumps(tag_frequency(spec)),
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


def train_all(out: Path, steps: int | None = None, only=None, library: Path | None = None) -> list[Path]:
    """Train every LoRA (or ``only`` these variants) on ``out/model``, write them to ``library`` (default: the
    shipped folder), record each one's time in ``out/loras-train.json``."""
    import torch

    from lora_composer.miniworld import train as tr

    library = library or library_dir()
    log = out / "loras-train.json"
    written = []
    for i, spec in enumerate(LORAS):
        if only and spec.value not in only:
            continue
        t0 = time.perf_counter()
        layers = tr.train_lora(
            out / "model",
            spec.category,
            spec.value,
            steps=steps or STEPS,
            seed=101 + i,
            w=community,
            allowed=community.variant_allowed(spec.category, spec.value),
            drop=0.0,
        )
        seconds = time.perf_counter() - t0
        written.append(write(out / "model", library, spec, layers))
        times = json.loads(log.read_text()) if log.exists() else {}  # re-read: parallel runs write too
        times[spec.name] = {
            "seconds": round(seconds, 1),
            "steps": steps or STEPS,
            "batch": 32,
            "threads": torch.get_num_threads(),
        }
        log.write_text(json.dumps(times, indent=2) + "\n")
    return written
