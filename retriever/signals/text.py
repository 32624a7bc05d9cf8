"""Text-semantic signal: the prompt vs. each adapter's trigger words and description, both embedded with
the base pipeline's own text encoder (:class:`lora_composer.retriever.encoder.TextEncoder`: centred, normalised token
states, averaged to one unit vector). Score = cosine, calibrated to [0, 1]: 0 at or below one standard
deviation of the cosine of random directions in ``d`` dimensions (``1 / sqrt(d)``), 1 at identical. A mean
of several token states is a blunter vector than one weight direction, hence a lower bar than the weight
signal's three standard deviations. Files with neither trigger words nor a description have no text score.
"""

from __future__ import annotations

import math

import numpy as np


def chance(dim: int) -> float:
    return min(0.9, 1.0 / math.sqrt(max(dim, 1)))


def calibrate(raw, dim: int):
    c = chance(dim)
    return np.clip((np.asarray(raw, dtype=np.float32) - c) / (1.0 - c), 0.0, 1.0)
