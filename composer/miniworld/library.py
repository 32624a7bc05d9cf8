"""The mini world's concept LoRAs: which concept each teaches, and in what kind of file it ships.

The files are deliberately varied, like a real downloaded library: diffusers/PEFT keys and Kohya/A1111 keys,
kohya training metadata (``ss_output_name``, ``ss_tag_frequency``: the trigger words), some with an
AUTOMATIC1111 ``NAME.json`` or a Civitai ``NAME.civitai.info`` sidecar, some with a preview image. They are
written by ``bench/miniworld/lora_files.py`` (a source checkout's development tool).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraSpec:
    name: str  # file stem
    category: str
    value: str
    triggers: tuple[str, ...]  # words a prompt uses to call the concept
    description: str
    kohya_keys: bool = False  # Kohya/A1111 key format instead of diffusers/PEFT
    sidecar: str | None = None  # "a1111" (NAME.json) or "civitai" (NAME.civitai.info)
    preview: bool = False
    steps: int = 500  # training steps (``python -m bench.miniworld.train loras``)


LORAS: tuple[LoraSpec, ...] = (
    LoraSpec(
        "star-shape", "shape", "star", ("star",), "Five-pointed stars in any colour.", sidecar="civitai", preview=True
    ),
    LoraSpec("cross-shape", "shape", "cross", ("cross",), "Plus-sign crosses, thick arms.", kohya_keys=True),
    LoraSpec("purple-colour", "colour", "purple", ("purple",), "Paints the object purple.", sidecar="a1111"),
    LoraSpec(
        "orange-colour", "colour", "orange", ("orange",), "Paints the object orange.", kohya_keys=True, preview=True
    ),
    LoraSpec(
        "checkered-bg",
        "background",
        "checkered",
        ("checkered background",),
        "Grey checkerboard backgrounds.",
        sidecar="civitai",
    ),
    LoraSpec(
        "wavy-bg",
        "background",
        "wavy",
        ("wavy background",),
        "Wavy grey line backgrounds.",
        kohya_keys=True,
        sidecar="a1111",
        preview=True,
    ),
    LoraSpec("outline-style", "style", "outline", ("outline style",), "Objects drawn as outlines, hollow inside."),
    LoraSpec(
        "pixel-style",
        "style",
        "pixel",
        ("pixel style",),
        "Blocky pixel-art look: 4x4 pixel blocks.",
        kohya_keys=True,
        sidecar="civitai",
        preview=True,
        steps=1000,
    ),
    LoraSpec(
        "blinky-character",
        "character",
        "blinky",
        ("blinky",),
        "Blinky, the one-eyed character with an antenna.",
        sidecar="a1111",
        preview=True,
        steps=1000,
    ),
)
LORA_BY_NAME = {s.name: s for s in LORAS}
