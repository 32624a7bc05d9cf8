"""merge: every adapter at its constant weight on every step (diffusers ``set_adapters``, A1111 stacking)."""

from __future__ import annotations

from lora_composer.fusion.base import StepPlan, Strategy


class MergeStrategy(Strategy):
    name = "merge"

    @property
    def static(self) -> bool:
        return True

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        return StepPlan(self.user_weights.unsqueeze(0))
