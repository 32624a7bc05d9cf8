"""The interface every fusion strategy implements.

For each denoiser call a strategy answers: how much of each adapter acts in each row group (and,
optionally, in each layer group), which row groups must be computed now and which may reuse their
last prediction, and how the groups' predictions are combined.

``weights[g, i]`` is adapter ``i``'s denoiser weight in row group ``g``. With one group the whole batch
shares the weights. With ``G`` groups the batch is run once per group (as row groups of one batched pass
where memory allows) and the predictions are combined as ``sum_g combine[g] * pred_g`` (the mean by
default): LoRA Composite without ``G`` sequential passes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class StepPlan:
    """What one denoiser call does.

    - ``weights``: ``[groups, adapters]``.
    - ``layer_weights``: optional ``{layer group: [groups, adapters]}`` overriding ``weights`` in those layer
      groups (e.g. ``unet.down_blocks.1``; see ``lora_composer.runtime.layer_group``).
    - ``combine``: optional ``[groups]`` weights of the groups' predictions (default: the mean).
    - ``reuse``: optional ``[groups]`` booleans: reuse that group's last prediction instead of computing it
      (the driver computes it anyway when nothing is cached yet).
    """

    weights: torch.Tensor
    layer_weights: dict[str, torch.Tensor] | None = None
    combine: torch.Tensor | None = None
    reuse: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return int(self.weights.shape[0])


class Strategy(ABC):
    """Decides per-step, per-row-group adapter weights. Subclasses set ``name`` and implement ``plan``."""

    name: str = ""

    def begin(self, adapters: list[str], weights: list[float], num_steps: int, context: dict | None = None) -> None:
        """Called once per generation with the adapters (in order), their user weights and the step count.

        ``context`` carries what some strategies need from the pipeline (e.g. the runtime, the prompt
        embeddings, the catalog); strategies that need nothing ignore it.
        """
        self.adapters = list(adapters)
        self.user_weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.num_steps = int(num_steps)
        self.context = context or {}

    def observe(self, step: int, timestep: float | None, inputs: dict) -> None:
        """Called before ``plan`` with the denoiser call's inputs (``sample``, ``encoder_hidden_states``...),
        for strategies that react to them (e.g. gates from the prompt's embeddings). Default: nothing."""

    def text_mask(self) -> torch.Tensor | None:
        """Optional ``[adapters]`` factors on the text-encoder weights for this generation (the prompt is
        encoded once, before the first step). ``None``: every adapter at its text-encoder weight."""
        return None

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
