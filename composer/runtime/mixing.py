"""The mixing tensor: how much of each adapter acts, per batch row.

Every patched layer of one component group reads the same ``MixingState``. Changing weights between
denoising steps is one small tensor write plus a version bump; layers refresh their per-rank scales
lazily, once per version, on their next forward.
"""

from __future__ import annotations

import torch


class MixingState:
    """``weights[rows, slots]``: row ``i`` of the batch gets ``weights[i, slot]`` of each adapter.

    One row broadcasts to the whole batch (merge); ``rows == batch`` routes adapters per row
    (Composite-style row groups). Slots are assigned by the runtime and shared by all layers.
    """

    def __init__(self, slots: int = 0):
        self.weights = torch.zeros(1, slots)
        self.enabled = True
        self.version = 0

    @property
    def slots(self) -> int:
        return self.weights.shape[1]

    def resize(self, slots: int) -> None:
        """Grow or shrink the slot axis, keeping existing weights."""
        new = torch.zeros(self.weights.shape[0], slots)
        keep = min(slots, self.slots)
        new[:, :keep] = self.weights[:, :keep]
        self.weights = new
        self.version += 1

    def set(self, weights: torch.Tensor) -> None:
        """Replace the weights: ``[slots]`` (one row for every batch row) or ``[rows, slots]``."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)
        if weights.shape[1] != self.slots:
            raise ValueError(f"expected weights for {self.slots} adapter slots, got {weights.shape[1]}")
        if weights.shape == self.weights.shape and torch.equal(weights, self.weights):
            return
        self.weights = weights.clone()
        self.version += 1

    def set_slot(self, slot: int, value: float) -> None:
        self.weights[:, slot] = float(value)
        self.version += 1

    def set_enabled(self, enabled: bool) -> None:
        if enabled != self.enabled:
            self.enabled = enabled
            self.version += 1

    @property
    def is_uniform(self) -> bool:
        """True when every row carries the same weights (the only case that can be fused)."""
        return bool((self.weights == self.weights[:1]).all())
