"""composite: every step, average the noise predictions of each adapter alone (LoRA Composite).

LoRA Composite is one of the two training-free composition methods of Zhong et al. 2024, "Multi-LoRA
Composition for Image Generation" (arXiv 2402.16843): on each denoising step the denoiser is evaluated
once per adapter, with only that adapter active, and the guided predictions are averaged.
"""

from __future__ import annotations

import torch

from lora_composer.fusion.base import StepPlan, Strategy


class CompositeStrategy(Strategy):
    """LoRA Composite: the step's noise prediction is the mean, over adapters, of the classifier-free-guided
    prediction with that adapter alone at its user weight.

    Each step plans ``N`` row groups (``N`` adapters) with ``weights = diag(user weights)``: group ``i`` runs
    adapter ``i`` only. The driver runs the groups as row groups of one batched denoiser pass (in several
    passes when ``ComposerPipeline(..., max_batch=...)`` caps the rows) and combines them with the mean.
    The paper averages the conditional and the unconditional predictions over adapters, then applies
    guidance; guidance is linear (``u + s (c - u)``), so the mean of the guided predictions is the same
    thing, and averaging the denoiser's output before the pipeline's guidance gives the same result.

    When to choose it: several LoRAs that each carry a distinct element and interfere when merged, when
    ``N`` times the denoiser work per step (rows, or passes under ``max_batch``) is affordable; every adapter
    acts on every step, unlike switch. The paper reports both composite and switch ahead of merge, more
    clearly as the number of LoRAs grows. With one adapter it is the same as merge.

    No parameters: each adapter acts at its user weight (the reference code applies one shared LoRA scale,
    0.8 by default, to all of them; pass that as the adapters' weights for the same setting). The strategy
    drives the denoiser only: the text encoders keep the weights the pipeline gives every adapter, as in
    the reference code, which encodes the prompt with all adapters active.
    """

    name = "composite"

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        if not len(self.adapters):
            return StepPlan(torch.zeros(1, 0))  # nothing to compose: the base model, one group
        return StepPlan(torch.diag(self.user_weights))
