"""Fusion strategies: how much of each adapter acts, per step, per layer group and per batch row."""

if __name__ == "fusion":  # top-level `fusion` from the repository root: not ours (see source_tree)
    from lora_composer.source_tree import defer_to_installed

    defer_to_installed(__name__, __file__)

from lora_composer.fusion.base import StepPlan, Strategy, StrategyContext
from lora_composer.fusion.registry import available, get_strategy

__all__ = ["StepPlan", "Strategy", "StrategyContext", "available", "get_strategy"]
