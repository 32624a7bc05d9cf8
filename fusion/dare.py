"""dare: DARE (Yu et al. 2024, "drop and rescale") on the LoRAs' dense deltas, then merge's single pass.

Per layer, each LoRA's delta keeps each entry with probability ``density`` and is divided by ``density``
(its expectation is unchanged); the results are summed at the user weights (``combine=linear``, PEFT's
``dare_linear``) or go through TIES' sign election and disjoint mean (``combine=ties``, PEFT's
``dare_ties``). The masks come from a generator seeded with ``seed``, drawn layer by layer in the order
the LoRAs touch them, LoRA by LoRA: the same call gives the same picture.
"""

from __future__ import annotations

import torch

from lora_composer.fusion.task_arithmetic import RuleMerge, check_density, elect_and_share


class DareStrategy(RuleMerge):
    name = "dare"
    suffix = "~dare"

    def __init__(
        self, density: float = 0.5, combine: str = "linear", sign: str = "total", seed: int = 0, rank: int = 0
    ):
        if combine not in ("linear", "ties"):
            raise ValueError(f"combine must be linear or ties, got {combine!r}")
        if sign not in ("total", "frequency"):
            raise ValueError(f"sign must be total or frequency, got {sign!r}")
        self.density = check_density(density)
        self.combine_rule = combine
        self.sign = sign
        if int(rank) < 0:
            raise ValueError(f"rank must be >= 0 (0: dense deltas), got {rank}")
        self.rank = int(rank)
        self.seed = int(seed)
        self._generator = None

    def rule(self, stack: torch.Tensor, names: list) -> torch.Tensor:
        if self.density < 1:
            keep = [torch.bernoulli(torch.full_like(t, self.density), generator=self._generator) for t in stack]
            stack = torch.stack([t * m / self.density for t, m in zip(stack, keep)])
        return elect_and_share(stack, self.sign) if self.combine_rule == "ties" else stack

    def begin(self, adapters, weights, num_steps, context=None) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)  # the same masks for the same call
        super().begin(adapters, weights, num_steps, context)

    def resolved(self) -> dict:
        return {"combine": self.combine_rule}  # ``combine`` is also the strategy's method
