"""Preview-image signal: open_clip image embedding of ``NAME.preview.png`` vs. the prompt's open_clip text
embedding.

Only used when an open_clip model is available **locally**: set ``LORA_COMPOSER_OPENCLIP_MODEL`` (an
open_clip architecture name, e.g. ``ViT-B-32``) and ``LORA_COMPOSER_OPENCLIP_WEIGHTS`` (a checkpoint file on
disk). Nothing is ever downloaded; without both, the signal is absent (its column block is not built and it
counts 0 in the fusion).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

MODEL_ENV = "LORA_COMPOSER_OPENCLIP_MODEL"
WEIGHTS_ENV = "LORA_COMPOSER_OPENCLIP_WEIGHTS"


class PreviewEncoder:
    def __init__(self, model_name: str, weights: str | None):
        import open_clip
        import torch

        self.torch = torch
        self.model, _, self.transform = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        tag = f"{model_name}:{weights or 'random'}"
        self.id = "openclip:" + hashlib.sha1(tag.encode()).hexdigest()[:16]
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[-1])

    def encode_text(self, prompt: str) -> np.ndarray:
        with self.torch.no_grad():
            v = self.model.encode_text(self.tokenizer([prompt]))[0].float()
        return (v / v.norm().clamp_min(1e-12)).numpy()

    def encode_images(self, paths: list[str]) -> list[np.ndarray | None]:
        from PIL import Image

        out = []
        for p in paths:
            try:
                img = self.transform(Image.open(p).convert("RGB"))[None]
            except Exception:  # noqa: BLE001 - unreadable preview: no signal for that file
                out.append(None)
                continue
            with self.torch.no_grad():
                v = self.model.encode_image(img)[0].float()
            out.append((v / v.norm().clamp_min(1e-12)).numpy())
        return out


def load_available() -> PreviewEncoder | None:
    """The configured local open_clip model, or None (no model configured or the file is missing)."""
    name, weights = os.environ.get(MODEL_ENV), os.environ.get(WEIGHTS_ENV)
    if not name or not weights or not Path(weights).is_file():
        return None
    try:
        return PreviewEncoder(name, weights)
    except Exception:  # noqa: BLE001 - a broken local model disables the signal, it does not break search
        return None


def ensure_embeddings(catalog, encoder: PreviewEncoder, family: str) -> int:
    todo = catalog.missing("preview", encoder.id, family)
    if not todo:
        return 0
    vecs = encoder.encode_images([r.preview or "" for r in todo])
    catalog.put_embeddings("preview", encoder.id, {r.id: (v if r.preview else None) for r, v in zip(todo, vecs)})
    return len(todo)
