"""Frequency profiling of LoRA adapters (the ordering signal of CMLoRA, Zou et al., ICLR 2025).

CMLoRA (Sec. 3, "LoRA in the Fourier domain") observes that some LoRAs mostly add high-frequency
content (edges, textures: characters, clothing, styles, objects) and others mostly low-frequency
content (layout, smooth colour: backgrounds), and composes them high-frequency first. The reference
code measures this in ``fft_analysis.ipynb`` (repository ``Yqcca/CMLoRA``): grey image -> 2-D FFT ->
``fftshift`` -> ``log`` amplitude -> average over integer-radius rings (the *radial profile*) ->
divided by its maximum -> mean over the rings at radius >= 72 on 512x512 renders.

Here an adapter's score is the **high-frequency share** of the radially averaged log amplitude of its
*contribution* (the render with that adapter alone minus the base render with no adapter):

    L(r)  = mean over ring r of log(1 + |FFT(hann * x)|),  x scaled so that max |x| = 255
    score = sum_{r >= r_c} L(r) / sum_{r >= 1} L(r)           in [0, 1]   (DC ring excluded)

Parameters and where they come from:

- ``cutoff=0.28125``: ``r_c`` as a fraction of the Nyquist radius ``min(H, W) / 2``; the notebook's
  ``low = 72`` on 512-pixel renders (72 / 256), kept as a fraction so it applies to any size.
- ``log(1 + |F|)`` instead of the notebook's ``log(|F| + 1e-8)``: a difference image has many
  near-zero coefficients whose ``log`` is very negative, which makes a max-normalised mean meaningless;
  ``log1p`` keeps every ring non-negative so the share is well defined. Scaling ``x`` to a peak of 255
  (the notebook reads 8-bit PNGs) makes the score independent of the contribution's magnitude.
- Hann window (ours, not in the notebook): without it a sharp wrap-around edge (any non-periodic
  image, e.g. a ramp) leaks energy into every frequency and reads as "high frequency".
- Multi-channel inputs (RGB, latents) average the amplitude spectra of their channels (the notebook
  averages RGB to grey first; averaging amplitudes avoids channels cancelling in latents).

:func:`profile_adapters` renders once with no adapter and once per adapter alone through a
``ComposerPipeline`` and keeps the scores in a small JSON file keyed by the adapter file's sha256
(``adapter.metadata.sha256``), so each file is profiled once (a SQLite catalog will take this over).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

CUTOFF = 72 / 256  # fft_analysis.ipynb: low = 72 on 512x512 renders (Nyquist radius 256)
CACHE_FILE = "frequency_profiles.json"


def _as_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    t = t.detach().to(torch.float64).cpu()
    if t.dim() < 2:
        raise ValueError(f"need an image of shape [..., H, W], got {tuple(t.shape)}")
    return t


def amplitude_spectrum(x, window: bool = True) -> torch.Tensor:
    """Centred ``|FFT2|`` of ``x`` (``[H, W]`` or channel-first ``[..., H, W]``), averaged over leading dims."""
    t = _as_tensor(x)
    h, w = t.shape[-2:]
    if window:  # remove each slice's mean first so the window does not smear the DC term into low rings
        t = t - t.mean(dim=(-2, -1), keepdim=True)
        t = t * torch.outer(
            torch.hann_window(h, periodic=False, dtype=t.dtype), torch.hann_window(w, periodic=False, dtype=t.dtype)
        )
    amp = torch.fft.fftshift(torch.fft.fft2(t), dim=(-2, -1)).abs()
    return amp.reshape(-1, h, w).mean(dim=0)


def radial_profile(spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of a centred ``[H, W]`` spectrum over integer-radius rings: ``(radii, profile)``."""
    h, w = spectrum.shape
    y = torch.arange(h, dtype=torch.float64) - h // 2
    x = torch.arange(w, dtype=torch.float64) - w // 2
    r = torch.sqrt(y[:, None] ** 2 + x[None, :] ** 2).long().flatten()
    sums = torch.zeros(int(r.max()) + 1, dtype=torch.float64).index_add_(0, r, spectrum.flatten().to(torch.float64))
    counts = torch.bincount(r, minlength=sums.numel()).to(torch.float64)
    return torch.arange(sums.numel()), sums / counts.clamp(min=1)


def log_amplitude_profile(x, window: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged ``log(1 + |F|)`` of ``x`` scaled to a peak of 255 (see the module docstring)."""
    t = _as_tensor(x)
    peak = t.abs().max()
    if peak > 0:
        t = t * (255.0 / peak)
    radii, profile = radial_profile(torch.log1p(amplitude_spectrum(t, window=window)))
    return radii, profile


def high_frequency_score(x, base=None, cutoff: float = CUTOFF, window: bool = True) -> float:
    """High-frequency share of ``x`` (or of ``x - base``): 0 = only smooth content, 1 = only fine detail."""
    t = _as_tensor(x)
    if base is not None:
        t = t - _as_tensor(base)
    if not float(t.abs().max()) > 0:
        return 0.0
    radii, profile = log_amplitude_profile(t, window=window)
    r_c = cutoff * min(t.shape[-2:]) / 2
    total = float(profile[1:].sum())
    return float(profile[radii >= math.ceil(r_c)].sum()) / total if total > 0 else 0.0


# -- cache --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    from lora_composer.cache import cache_dir

    return cache_dir() / "frequency"


def _cache_path(cache_dir) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / CACHE_FILE


def load_cache(cache_dir=None) -> dict:
    path = _cache_path(cache_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(entries: dict, cache_dir=None) -> None:
    path = _cache_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
    os.replace(tmp, path)


def cached_scores(adapters, cache_dir=None) -> dict[str, float]:
    """Scores of the ``Adapter`` objects already profiled (by file sha256); the others are left out."""
    entries = load_cache(cache_dir)
    out = {}
    for adapter in adapters:
        entry = entries.get(getattr(adapter.metadata, "sha256", "") or "")
        if isinstance(entry, dict) and isinstance(entry.get("score"), (int, float)):
            out[adapter.name] = float(entry["score"])
    return out


def _image_chw(images) -> torch.Tensor:
    """First image of a pipeline's ``output_type="np"`` result ``[B, H, W, C]`` as ``[C, H, W]``."""
    return torch.as_tensor(np.asarray(images)[0]).permute(2, 0, 1)


def profile_adapters(
    composer,
    names,
    prompt: str,
    steps: int = 20,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    weight: float = 1.0,
    cache_dir=None,
    refresh: bool = False,
) -> dict[str, float]:
    """High-frequency score of each adapter in ``names`` (attached names, library names or paths).

    Renders the base (no adapter) and each adapter alone at ``weight`` with ``prompt``/``steps``/``seed``
    through ``composer`` (a :class:`~lora_composer.pipeline.ComposerPipeline`), scores each render minus the
    base with :func:`high_frequency_score`, and stores the scores by file sha256 in ``cache_dir``
    (default ``<composer cache>/frequency``). Files already in the cache are not rendered again
    (``refresh=True`` renders them anyway).
    """
    attached = composer.adapters
    adapters = [attached[n] if n in attached else composer.load_lora(n) for n in names]
    entries = load_cache(cache_dir)
    scores: dict[str, float] = {} if refresh else cached_scores(adapters, cache_dir)
    todo = [a for a in adapters if a.name not in scores]
    if not todo:
        return {a.name: scores[a.name] for a in adapters}

    call = dict(
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        height=height,
        width=width,
        output_type="np",
        progress=False,
    )
    base = _image_chw(composer(prompt, loras=[], **call))
    for adapter in todo:
        image = _image_chw(composer(prompt, loras=[(adapter.path or adapter.name, weight)], **call))
        scores[adapter.name] = high_frequency_score(image, base=base)
        if adapter.metadata.sha256:
            entries[adapter.metadata.sha256] = {
                "score": scores[adapter.name],
                "name": adapter.name,
                "prompt": prompt,
                "steps": steps,
                "seed": seed,
                "weight": weight,
                "model": getattr(composer, "model", ""),
            }
    _save_cache(entries, cache_dir)
    return {a.name: scores[a.name] for a in adapters}
