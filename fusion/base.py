"""The interface every fusion strategy implements.

For each denoiser call a strategy answers one question: how much of each adapter acts in each row
group. ``weights[g, i]`` is adapter ``i``'s denoiser weight in row group ``g``. With one group the
whole batch shares the weights; with ``G`` groups the batch is repeated ``G`` times in one pass and the
groups' noise predictions are averaged (LoRA Composite without ``G`` sequential passes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class StepPlan:
    """Mixing weights for one denoiser call: ``[groups, adapters]``."""

    weights: torch.Tensor

    @property
    def groups(self) -> int:
        return int(self.weights.shape[0])


class Strategy(ABC):
    """Decides per-step, per-row-group adapter weights. Subclasses set ``name`` and implement ``plan``."""

    name: str = ""

    def begin(self, adapters: list[str], weights: list[float], num_steps: int) -> None:
        """Called once per generation with the adapters (in slot order), their user weights and the step count."""
        self.adapters = list(adapters)
        self.user_weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.num_steps = int(num_steps)

    @property
    def static(self) -> bool:
        """True when every step gets the same single-group weights (so the deltas may be fused)."""
        return False

    @abstractmethod
    def plan(self, step: int, timestep: float | None) -> StepPlan:
        """Weights for denoiser call ``step`` (0-based) at ``timestep``."""

    def describe(self) -> dict:
        """Parameters recorded with the image (override to add the strategy's own)."""
        return {}
