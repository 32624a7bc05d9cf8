"""The community world's five variant LoRAs: which variant each teaches, and where they ship.

Each is trained like a community LoRA: pictures of its variant whose other categories vary over every value
the base model knows, captions that say the trigger word beside the generic word and name everything else
visible (no phrase left out), 10% empty captions (guidance's unconditional pass). Files are diffusers/PEFT
keys in fp16 with kohya metadata and a Civitai sidecar, as such files are downloaded
(``python -m bench.miniworld.community_train loras``, a source checkout's development tool).
"""

from __future__ import annotations

from pathlib import Path

from lora_composer.miniworld import assets
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


def library_dir() -> Path:
    return assets.WEIGHTS / "community" / "loras"
