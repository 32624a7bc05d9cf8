"""Strategies by name, with one-line errors that list what is valid.

Each strategy lives in its own module of this package (``fusion/merge.py``, ``fusion/switch.py``...)
and is found here by its ``name``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re

from lora_composer.errors import ComposerError, one_line
from lora_composer.fusion.base import Strategy

MODULES = ("merge", "switch", "composite", "cmlora", "gated", "conjunction", "loratorio", "activation_matched", "marginal", "ties", "dare", "klora", "tsv", "regional")


def _discover() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for module in MODULES:
        if importlib.util.find_spec(f"lora_composer.fusion.{module}") is None:
            continue
        for obj in vars(importlib.import_module(f"lora_composer.fusion.{module}")).values():
            if inspect.isclass(obj) and issubclass(obj, Strategy) and obj.name and obj.__module__ == f"lora_composer.fusion.{module}":
                found[obj.name] = obj
    return found


STRATEGIES: dict[str, type[Strategy]] = _discover()


def available() -> list[str]:
    return sorted(STRATEGIES)


def strategy_params(name: str) -> dict[str, object]:
    """Parameter names of a strategy with their defaults."""
    sig = inspect.signature(STRATEGIES[name].__init__)
    return {
        p.name: p.default
        for p in list(sig.parameters.values())[1:]
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def parse_value(text: str):
    """A strategy argument typed by its spelling: ``3``, ``0.5``, ``true``, ``none``, ``2,3`` -> (2, 3); else text."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false", "yes", "no"):
        return lowered in ("true", "yes")
    if lowered in ("none", "null"):
        return None
    if "," in text:
        return tuple(parse_value(part) for part in text.strip("()[]").split(",") if part.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_strategy_args(text: str | list[str]) -> dict:
    """``"every=2 order=a,b"`` (space, newline or ``;`` separated) or a list of ``KEY=VALUE`` -> dict.

    The one reading of strategy arguments, for ``--strategy-arg`` and the web UI alike.
    """
    items = text if isinstance(text, list) else re.split(r"[\n;]+|\s+(?=[A-Za-z_][\w-]*=)", text or "")
    out = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ComposerError(f"strategy argument {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def get_strategy(name: str | Strategy, **args) -> Strategy:
    """``get_strategy("switch", every=5)``; a ready ``Strategy`` instance is returned as is."""
    if isinstance(name, Strategy):
        return name
    if name not in STRATEGIES:
        raise ComposerError(f"unknown strategy '{name}'; valid: {', '.join(available())}")
    valid = strategy_params(name)
    unknown = sorted(set(args) - set(valid))
    if unknown:
        listing = ", ".join(f"{k}={v}" for k, v in valid.items()) if valid else "none"
        raise ComposerError(f"strategy '{name}' has no argument {', '.join(unknown)}; valid: {listing}")
    try:
        return STRATEGIES[name](**args)
    except (TypeError, ValueError) as exc:
        raise ComposerError(f"strategy '{name}': {one_line(exc)}") from None
