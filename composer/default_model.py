"""The local default model used when no ``--model`` is given.

Until a trained default model ships, this is the tiny SD1.5-shaped pipeline from :mod:`composer.tiny`
(random weights: the images are noise, but every code path runs, offline, in a fraction of a second),
saved once with ``save_pretrained`` together with a small library of demo LoRAs:

- ``demo-shapes.safetensors``: diffusers/PEFT format, with a Civitai-style sidecar ``demo-shapes.civitai.info``
  (``trainedWords``, ``description``);
- ``demo-ink.safetensors``: Kohya/A1111 format with kohya training metadata (``ss_output_name``,
  ``ss_tag_frequency``: its trigger words).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from composer import tiny

DEFAULT_DIR_NAME = "default-tiny-sd15"
MODEL_DIR_NAME = "tiny-sd15-random"
LIBRARY_DIR_NAME = "loras"
DEMO_LORAS = ("demo-shapes", "demo-ink")
DEFAULT_SIZE = 64

_BUILD_FORMAT = 1  # bump when the layout changes; a cache with another format is rebuilt


def default_model_root(cache_dir: str | os.PathLike | None = None) -> Path:
    base = Path(cache_dir) if cache_dir is not None else tiny.default_cache_dir()
    return base / DEFAULT_DIR_NAME


def is_default_model(model: str | os.PathLike) -> bool:
    """Whether ``model`` names a default demo model folder (in this cache or another one)."""
    p = Path(model)
    return p.name == MODEL_DIR_NAME and p.parent.name == DEFAULT_DIR_NAME


def _is_complete(root: Path) -> bool:
    try:
        info = json.loads((root / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == _BUILD_FORMAT and (root / MODEL_DIR_NAME / "model_index.json").is_file()


def _quiet_save(pipe, path: Path) -> None:
    """``save_pretrained`` without transformers' "Writing model shards" progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(str(path), safe_serialization=True)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _build(into: Path, seed: int = 0) -> None:
    pipe = tiny.build_tiny_sd15_pipeline(seed=seed)
    # Default output size 64x64 (the VAE halves once: latents 32x32) instead of the builder's 16x16.
    pipe.unet.register_to_config(sample_size=DEFAULT_SIZE // pipe.vae_scale_factor)
    _quiet_save(pipe, into / MODEL_DIR_NAME)

    library = into / LIBRARY_DIR_NAME
    library.mkdir(parents=True)
    rank = 4

    shapes = tiny.random_lora_layers(pipe, rank=rank, seed=1)
    tiny.save_diffusers_lora(pipe, shapes, library / "demo-shapes.safetensors", rank=rank, alpha=rank)
    sidecar = {
        "name": "demo-shapes",
        "trainedWords": ["geometric shapes", "flat colors"],
        "description": "Demo LoRA (random weights) for the tiny default model, diffusers format.",
        "baseModel": "SD 1.5",
    }
    (library / "demo-shapes.civitai.info").write_text(json.dumps(sidecar, indent=2) + "\n")

    ink = tiny.random_lora_layers(pipe, rank=rank, seed=2)
    metadata = {
        "ss_output_name": "demo-ink",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank / 2),
        "ss_base_model_version": "sd_v1",
        "ss_tag_frequency": json.dumps({"10_inkdrawing": {"ink drawing": 24, "monochrome": 17, "sketch": 9}}),
    }
    tiny.save_kohya_lora(ink, library / "demo-ink.safetensors", alpha=rank / 2, metadata=metadata)

    (into / "README.txt").write_text(
        "lora-composer default demo model: a tiny SD1.5-shaped pipeline with random weights, built offline\n"
        "from configs. It produces noise; pass --model DIR_OR_HUB_ID to use a real Stable Diffusion model.\n"
    )
    (into / "build.json").write_text(json.dumps({"format": _BUILD_FORMAT, "seed": seed}) + "\n")


def ensure_default_model(cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> tuple[Path, Path]:
    """Return ``(model_dir, library_dir)`` of the default demo model, building it on first use.

    The build goes to a temporary folder next to the destination and is renamed into place, so an
    interrupted build never leaves a half-written model (and concurrent builds do not collide).
    """
    root = default_model_root(cache_dir)
    if not _is_complete(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print(
                f"lora-composer: building the default demo model in {root} (a tiny SD1.5-shaped model with "
                "random weights, built offline: images are noise; use --model for a real one)",
                file=sys.stderr,
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DIR_NAME}-build-", dir=root.parent))
        try:
            _build(tmp)
            if _is_complete(root):  # another process finished first: use its build
                return root / MODEL_DIR_NAME, root / LIBRARY_DIR_NAME
            if root.exists():  # stale (older format or damaged): move it aside, then replace it
                stale = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DIR_NAME}-old-", dir=root.parent))
                os.replace(root, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, root)
            except OSError:
                if not _is_complete(root):  # another process did not win the race either
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / MODEL_DIR_NAME, root / LIBRARY_DIR_NAME
