"""Detectors: a small CNN that says which value of every category a 64x64 picture shows.

They are the mini world's judge: a composed LoRA image scores by whether the detector finds the concepts its
prompt asked for. Each world (``world``, ``community``: a module with ``CATEGORIES``) has its own detector;
the file records the categories it was trained for and is refused by another world. The shipped ones were
trained by ``bench/miniworld/train_detectors.py`` (a source checkout's development tool).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_composer.errors import ComposerError
from lora_composer.miniworld import world

FORMAT = "lora-composer-miniworld-detector"
RETRAIN = "python -m bench.miniworld.train_detectors --out"  # in a source checkout


class DetectorFileError(ComposerError, ValueError):
    """A detector file is missing, unreadable or made for another version of the mini world."""

    def __init__(self, path, cause: str):
        self.path = str(path)
        self.cause = " ".join(str(cause).split())
        super().__init__(f"{self.path}: {self.cause}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
    )


class Detector(nn.Module):
    """Four conv blocks (64 -> 4 pixels) shared by one linear head per category (``categories``: the world's,
    default the one-object world's)."""

    def __init__(self, width: int = 32, categories=None):
        super().__init__()
        self.categories = tuple(categories or world.CATEGORIES)
        self.features = nn.Sequential(
            _block(3, width // 2),
            _block(width // 2, width),
            _block(width, 2 * width),
            _block(2 * width, 2 * width),
            nn.Flatten(),
            nn.Dropout(0.1),
        )
        flat = 2 * width * (world.SIZE // 16) ** 2
        self.heads = nn.ModuleDict({c.name: nn.Linear(flat, len(c.values)) for c in self.categories})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per category for float ``(n, 3, 64, 64)`` in [-1, 1]."""
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def probs(self, images, batch: int = 256) -> dict[str, torch.Tensor]:
        """Softmax per category, ``(n, len(values))``, for PIL images, uint8 ``(n, H, W, 3)`` or float tensors."""
        x = as_input(images)
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            chunks = [self(x[i : i + batch].to(device)) for i in range(0, len(x), batch)]
        finally:
            self.train(was_training)
        empty = {c.name: torch.zeros(0, len(c.values)) for c in self.categories}
        return {
            name: torch.cat([ch[name].cpu() for ch in chunks] or [logits]).softmax(-1) for name, logits in empty.items()
        }

    def predict(self, images) -> list[dict[str, str]]:
        """The most likely value of every category, per image."""
        probs = self.probs(images)
        n = len(next(iter(probs.values())))
        best = {c.name: probs[c.name].argmax(-1).tolist() for c in self.categories}
        return [{c.name: c.values[best[c.name][i]] for c in self.categories} for i in range(n)]


# ------------------------------------------------------------------------------------------------ inputs
def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, H, W, 3)`` -> float ``(n, 3, H, W)`` in [-1, 1], as the detector and the VAE take pictures."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def as_input(images) -> torch.Tensor:
    """Any accepted image batch as the detector's float ``(n, 3, 64, 64)`` in [-1, 1] (bilinear resize)."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list of images must hold PIL images only")
        size = (world.SIZE, world.SIZE)
        rgb = [im.convert("RGB") for im in images]
        images = (
            np.zeros((0, *size, 3), np.uint8)
            if not rgb
            else np.stack([np.asarray(im if im.size == size else im.resize(size, Image.BILINEAR)) for im in rgb])
        )
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (n, H, W, 3), got {images.dtype} {images.shape}")
        images = to_tensor(images)
    if (
        not isinstance(images, torch.Tensor)
        or not images.is_floating_point()
        or images.ndim != 4
        or images.shape[1] != 3
    ):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected float images (n, 3, H, W) in [-1, 1], got {shape}")
    x = images.detach().float()
    if x.shape[-2:] != (world.SIZE, world.SIZE) and len(x):
        x = F.interpolate(x, size=(world.SIZE, world.SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


# --------------------------------------------------------------------------------------------------- files
def _categories_metadata(categories=world.CATEGORIES) -> str:
    return json.dumps({c.name: list(c.values) for c in categories})


def save_detector(detector: Detector, path) -> Path:
    """Write ``path`` (safetensors, atomically) with the category/value lists it was trained for in its header."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "categories": _categories_metadata(detector.categories)})
    os.replace(tmp, path)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise DetectorFileError(path, f"no such detector file (train one: {RETRAIN} PATH)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: truncated, corrupt, not safetensors
        raise DetectorFileError(path, f"not a readable safetensors file (truncated or corrupt?): {e}") from None


def _mismatch(stored, current: dict[str, list[str]]) -> str:
    """Only the categories that differ, so the error stays readable on one line."""
    if not isinstance(stored, dict) or list(stored) != list(current):
        names = list(stored) if isinstance(stored, dict) else stored
        return f"trained for categories {json.dumps(names)}, but the mini world has {json.dumps(list(current))}"
    diffs = [
        f"{name} {json.dumps(stored[name])} (now {json.dumps(values)})"
        for name, values in current.items()
        if stored[name] != values
    ]
    return "trained for other values: " + ", ".join(diffs)


def load_detector(path, w=world) -> Detector:
    """The detector in ``path``, refused unless it was trained for world ``w``'s categories and values."""
    path = Path(path)
    tensors, header = _read(path)
    if header.get("format") != FORMAT:
        raise DetectorFileError(path, f"not a mini-world detector (format {header.get('format')!r})")
    try:
        stored = json.loads(header.get("categories", ""))
    except json.JSONDecodeError:
        raise DetectorFileError(path, "its 'categories' metadata is not JSON") from None
    current = json.loads(_categories_metadata(w.CATEGORIES))
    if stored != current:
        raise DetectorFileError(path, f"{_mismatch(stored, current)}; retrain it ({RETRAIN} {path})")
    detector = Detector(categories=w.CATEGORIES)
    try:
        detector.load_state_dict(tensors)
    except RuntimeError as e:
        raise DetectorFileError(path, f"weights do not fit the detector: {e}") from None
    return detector.eval()
