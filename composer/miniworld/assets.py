"""Where the trained mini world ships: the model, its concept LoRA library and the detectors.

They are committed with the project (``composer/miniworld/weights``, under 40 MB; ``weights/community``
holds the community world's), so ``compose`` renders meaningful pictures offline on a fresh clone. In a source
checkout, ``python -m bench.miniworld.train all --out DIR`` and
``python -m bench.miniworld.train_detectors --out DIR/detectors.safetensors`` rebuild them.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_NAME = "miniworld"  # how images record the model (the model folder's lora-composer.json says so too)
DEFAULT_GUIDANCE = 5.0  # what the mini world's model was tuned for (docs/EVAL.md)
DEFAULT_STEPS = 20


def model_dir() -> Path:
    return WEIGHTS / "model"


def library_dir() -> Path:
    return WEIGHTS / "loras"


def detector_path() -> Path:
    return WEIGHTS / "detectors.safetensors"


def two_objects_dir() -> Path:
    """The two-object world's fine-tuned UNet and training figures (the rest is the model above)."""
    return WEIGHTS / "two-objects"
