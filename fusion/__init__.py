"""Fusion strategies: how much of each adapter acts, per step, per layer group and per batch row."""

from lora_composer.fusion.base import StepPlan, Strategy, StrategyContext
from lora_composer.fusion.registry import available, get_strategy

__all__ = ["StepPlan", "Strategy", "StrategyContext", "available", "get_strategy"]
