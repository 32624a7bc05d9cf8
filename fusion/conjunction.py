"""conjunction: Composable Diffusion's AND applied to LoRAs, a product of experts in score space.

Liu et al. 2022, "Compositional Visual Generation with Composable Diffusion Models" (arXiv 2206.01714),
compose concepts with ``e = e(x) + sum_i w_i (e(x | c_i) - e(x))``. Here each expert is the denoiser with one
LoRA alone and the reference is the base model (no LoRA), all on the same prompt:

    e = e_base + sum_i w_i (e_i - e_base)

Each LoRA contributes its own change to the score, and the changes add up (a product of the experts'
densities), where LoRA Composite averages the predictions (a mixture, which dilutes each LoRA's change by
``1 / N``).
"""

from __future__ import annotations

import torch

from lora_composer.fusion.base import StepPlan, Strategy


class ConjunctionStrategy(Strategy):
    """AND of the LoRAs: ``e_base + sum_i w_i (e_i - e_base)``, every step.

    Each step plans ``N + 1`` row groups: group ``i`` runs adapter ``i`` alone at its **user weight**
    (as every strategy does: the user weight is how strongly the LoRA acts inside its pass), the last group
    runs the base model (every adapter at 0). The groups are combined linearly with
    ``combine = (w_1, ..., w_N, 1 - sum_i w_i)``, which is the formula above. ``w_i`` (``scales``) are the
    conjunction weights, how much of each LoRA's score change is added: 1 by default (each LoRA's change
    in full); they act on the score, not on the LoRA's weights, so ``scales=0.5`` is not the same as user
    weight 0.5 (a LoRA's effect on the prediction is not linear in its weight).

    Guidance: each row group is the pipeline's whole batch (with classifier-free guidance, its negative and
    positive rows), the driver combines the groups' outputs row by row and the pipeline applies guidance
    ``u + s (c - u)`` to the result. Guidance is linear in ``(u, c)``, so this equals the conjunction of
    the guided predictions of every group (checked in ``tests/test_fusion_conjunction_loratorio.py``); the
    negative rows are combined with the same weights, so the unconditional score is the conjunction of
    the LoRAs' unconditional scores.

    Cost: ``N + 1`` times merge's denoiser rows per step (one batched pass, or several under ``max_batch``).

    When to choose it (measured on the mini world, ``docs/EVAL.md``): on concepts a base model
    does not know, it renders what the mean of single-LoRA passes (composite) loses, since no LoRA's change
    is diluted; it did not beat merge there (see ``docs/EVAL.md``), and at ``N + 1`` times the cost merge
    stays the first choice on this world. Parameters: ``scales`` (one number for every LoRA, or one per LoRA).
    """

    name = "conjunction"

    def __init__(self, scales: float | tuple | list | None = None):
        if scales is not None and not isinstance(scales, (int, float, tuple, list)):
            raise TypeError(f"scales must be a number or one number per adapter, got {scales!r}")
        self.scales = scales

    def begin(self, adapters, weights, num_steps, context=None) -> None:
        super().begin(adapters, weights, num_steps, context)
        n = len(self.adapters)
        if self.scales is None:
            w = [1.0] * n
        elif isinstance(self.scales, (int, float)):
            w = [float(self.scales)] * n
        else:
            w = [float(x) for x in self.scales]
            if len(w) != n:
                raise ValueError(f"scales has {len(w)} values for {n} adapters")
        self.conjunction_weights = torch.tensor(w, dtype=torch.float32)

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        n = len(self.adapters)
        if not n:
            return StepPlan(torch.zeros(1, 0))  # nothing to compose: the base model, one group
        weights = torch.cat([torch.diag(self.user_weights), torch.zeros(1, n)])  # last group: the base
        w = self.conjunction_weights
        return StepPlan(weights, combine=torch.cat([w, (1.0 - w.sum()).reshape(1)]))
