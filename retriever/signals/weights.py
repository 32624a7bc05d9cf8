"""Training-free weight encoding: which text directions an adapter's cross-attention deltas respond to.

The cross-attention key/value layers (``attn2.to_k``/``attn2.to_v``) are the only denoiser layers that read
the prompt, and they read it as token states ``e`` (what ``encode_prompt`` returns). Over those layers::

    response(e) = sum_l ||dW_l e||^2 = e^T M e,     M = sum_l dW_l^T dW_l,   dW_l = alpha_l / r_l * U_l D_l

``M`` is [d, d] with rank at most the sum of ranks. With ``U_l = Q_l R_l`` (QR), ``dW_l^T dW_l = (s R_l D_l)^T
(s R_l D_l)``, so stacking ``Z = [s_l R_l D_l]_l`` gives ``M = Z^T Z`` and its eigenvectors are ``Z``'s right
singular vectors: one small SVD per file. We keep the top ``DIRECTIONS`` of them scaled by the share of the
total response energy they carry (``sqrt(lambda_j / trace M)``): ``P [m, d]``.

For a prompt with centred unit token states ``e_hat_t``, the adapter's score is::

    cos_t = sqrt(sum_j (P_j . e_hat_t)^2)       (in [0, 1]: 1 = all its energy along this token)
    raw   = max_t cos_t

It does not depend on the overall size of the deltas (a strong training run does not win everything), only on
*where* in text space they act. Calibrated to [0, 1] by :func:`calibrate` against the chance level of a random
direction in ``d`` dimensions. Adapters without key/value deltas of the prompt's width have no score.
"""

from __future__ import annotations

import math

import numpy as np

from lora_composer.adapters.kinds import has_factors
from lora_composer.vocab import CROSS_ATTENTION_KV as KV_SUFFIXES
from lora_composer.vocab import DENOISERS

DIRECTIONS = 2


def _has_factors(d) -> bool:
    """Whether the delta reads as 2-D low-rank factors. IA3 and OFT scale or rotate the base weight: what they
    respond to depends on that weight, which this signal does not read, so their layers are left out."""
    return has_factors(d) and d.down.dim() == 2


def kv_deltas(adapter):
    for key, d in adapter.deltas.items():
        if key.split(".", 1)[0] in DENOISERS and key.endswith(KV_SUFFIXES) and _has_factors(d):
            yield key, d


def encode_adapter(adapter, directions: int = DIRECTIONS) -> tuple[np.ndarray, float] | None:
    """``(P [m, d] float32, energy share of the kept directions)`` or None without key/value deltas.

    Layers of different input widths: the most common width wins (SDXL's is the only one in practice)."""
    by_width: dict[int, list] = {}
    for _, d in kv_deltas(adapter):
        by_width.setdefault(int(d.down.shape[1]), []).append(d)
    if not by_width:
        return None
    width = max(by_width, key=lambda w: (len(by_width[w]), w))
    blocks = []
    for d in by_width[width]:
        up = d.up.detach().float().numpy()
        r = np.linalg.qr(up, mode="r")  # up = q r, so up^T up = r^T r  (numpy: far cheaper than torch here)
        blocks.append(d.scale * (r @ d.down.detach().float().numpy()))
    z = np.concatenate(blocks).astype(np.float64)
    if not np.isfinite(z).all():
        return None
    _, s, vh = np.linalg.svd(z, full_matrices=False)
    energy = s**2
    total = float(energy.sum())
    if total <= 0:
        return None
    m = min(directions, vh.shape[0])
    p = (vh[:m] * np.sqrt(energy[:m] / total)[:, None]).astype(np.float32)
    if p.shape[0] < directions:  # pad: zero rows contribute nothing
        p = np.concatenate([p, np.zeros((directions - p.shape[0], p.shape[1]), np.float32)])
    return p, float(energy[:m].sum() / total)


def chance(dim: int) -> float:
    """About three standard deviations of the cosine of two random directions in ``dim`` dimensions."""
    return min(0.9, 3.0 / math.sqrt(max(dim, 1)))


def calibrate(raw, dim: int):
    """Raw cosine -> [0, 1]: 0 at or below chance, 1 at perfect alignment."""
    c = chance(dim)
    return np.clip((np.asarray(raw, dtype=np.float32) - c) / (1.0 - c), 0.0, 1.0)
