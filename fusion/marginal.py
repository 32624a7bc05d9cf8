"""marginal: merge, plus each LoRA's marginal contribution to the merge amplified (leave-one-out guidance).

Merge loses concepts when LoRAs interfere: each was trained alone, and in the sum of deltas one LoRA's change
partly undoes another's (a star LoRA trained on base colours pulls the colour back from purple). Composable
Diffusion's AND (``conjunction``) measures each LoRA's change against the *base* model, where the others are
absent, so it cannot see that interference. Here each LoRA's change is measured *in the context of the others*:
the merge with every LoRA, against the merge without that one,

    e = e_all + lambda * sum_i (e_all - e_{all without i})

and each difference, a direction in which LoRA ``i`` still moves the composed picture, is followed further.
A concept the merge renders weakly has a large marginal direction and gains most. With one LoRA this is
``e_lora + lambda (e_lora - e_base)``: the LoRA's change amplified by ``1 + lambda``.
"""

from __future__ import annotations

import torch

from lora_composer.fusion.base import StepPlan, Strategy


class MarginalStrategy(Strategy):
    """``e_all + scale * sum_i (e_all - e_{all without i})``, during the first ``until`` fraction of steps.

    Each such step plans ``N + 1`` row groups: group 0 runs every adapter at its user weight (the merge), group
    ``i`` every adapter but ``i``; they are combined linearly with ``(1 + scale N, -scale, ..., -scale)``.
    Guidance: every group is the whole batch (negative and positive rows), and guidance is linear, so the
    result is the formula above on the guided predictions. After ``until`` (a fraction of the steps; 1: every
    step) only the merge group runs: the composition is laid out in the early, high-noise steps, and the
    later ones refine details the merge already renders.

    Cost: ``N + 1`` times merge's denoiser rows on the amplified steps, merge's on the others.

    When to choose it: when one concept of a merge is weak and the picture can take a push. Measured on the
    mini world (``docs/EVAL.md``, development seed) it did not beat merge: every step, it lifts the weakest
    concept but over-drives the picture (base-concept confidence 0.72 vs 0.97); ``until=0.3`` keeps the picture
    (0.94) at 0.51 all-concepts vs merge's 0.56 over 3 and 4 LoRAs.
    Parameters: ``scale`` (lambda, default 1), ``until`` (default 1).
    """

    name = "marginal"

    def __init__(self, scale: float = 1.0, until: float = 1.0):
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"scale must be a number >= 0, got {scale!r}")
        if not isinstance(until, (int, float)) or not 0 <= until <= 1:
            raise ValueError(f"until must be a fraction of the steps in [0, 1], got {until!r}")
        self.scale = float(scale)
        self.until = float(until)

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        n = len(self.adapters)
        merged = self.user_weights.unsqueeze(0)
        if not n or self.scale == 0 or step >= self.until * self.num_steps:
            return StepPlan(merged)
        leave_out = self.user_weights.repeat(n, 1) * (1 - torch.eye(n))
        combine = torch.cat([torch.tensor([1.0 + self.scale * n]), torch.full((n,), -self.scale)])
        return StepPlan(torch.cat([merged, leave_out]), combine=combine)
