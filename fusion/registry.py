"""Strategies by name, with one-line errors that list what is valid."""

from __future__ import annotations

import inspect

from composer.errors import ComposerError
from fusion.base import Strategy
from fusion.merge import MergeStrategy

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (MergeStrategy,)}


def available() -> list[str]:
    return sorted(STRATEGIES)


def strategy_params(name: str) -> dict[str, object]:
    """Parameter names of a strategy with their defaults."""
    sig = inspect.signature(STRATEGIES[name].__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:] if p.kind is p.KEYWORD_ONLY or p.default is not p.empty}


def get_strategy(name: str | Strategy, **args) -> Strategy:
    """``get_strategy("merge")``; a ready ``Strategy`` instance is returned as is."""
    if isinstance(name, Strategy):
        return name
    if name not in STRATEGIES:
        raise ComposerError(f"unknown strategy '{name}'; valid: {', '.join(available())}")
    valid = strategy_params(name)
    unknown = sorted(set(args) - set(valid))
    if unknown:
        listing = ", ".join(valid) if valid else "none"
        raise ComposerError(f"strategy '{name}' has no argument {', '.join(unknown)}; valid: {listing}")
    return STRATEGIES[name](**args)
