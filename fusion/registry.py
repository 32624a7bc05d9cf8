"""Strategies by name, with one-line errors that list what is valid.

Each strategy lives in its own module of this package (``fusion/merge.py``, ``fusion/switch.py``...) and is
found here by its ``name``: adding a strategy is adding its module.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

from lora_composer.errors import ComposerError, one_line
from lora_composer.fusion.base import Strategy


def _discover() -> dict[str, type[Strategy]]:
    """Every strategy class of every module in this package. A module that fails to import stops here with
    its name (``compose --help`` fails with it), rather than its strategy silently going missing."""
    package = importlib.import_module("lora_composer.fusion")
    found: dict[str, type[Strategy]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        name = f"lora_composer.fusion.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure of a strategy module is reported with its name
            raise ImportError(f"strategy module {name} fails to import: {one_line(exc)}") from exc
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Strategy) and obj.name and obj.__module__ == name:
                if obj.name in found:
                    raise ImportError(
                        f"strategy name '{obj.name}' is taken twice: {found[obj.name].__module__}, {name}"
                    )
                found[obj.name] = obj
    return found


STRATEGIES: dict[str, type[Strategy]] = _discover()

# Not a strategy but a choice of one, made per call by ComposerPipeline from the prompt's regions, the model's
# measured world and the number of LoRAs (lora_composer.measured.auto); the image records the strategy used.
AUTO = "auto"
AUTO_HELP = (
    "regional when the prompt has BREAK regions; otherwise the strategy that measured best at that many "
    "LoRAs in the model's mini world (the lines below), merge for any other model; the image records the "
    "strategy used"
)


def available() -> list[str]:
    return sorted(STRATEGIES)


def choices() -> list[str]:
    """What a front end offers: ``auto`` and every strategy."""
    return [AUTO, *available()]


def resolve_auto(prompt: str, loras: int, world: str = "") -> tuple[str, str]:
    """``auto`` for one call: ``(strategy, why)`` from the prompt's regions (``BREAK``), the number of LoRAs and
    the model's measured world (``""``: none)."""
    from lora_composer import measured
    from lora_composer.prompt_syntax import split_regions

    regions = len(split_regions(prompt)[1]) > 1
    candidates = [name for name, cls in STRATEGIES.items() if not cls.regional]
    return measured.auto(world, int(loras), regions, candidates)


def strategy_params(name: str) -> dict[str, object]:
    """Parameter names of a strategy with their defaults."""
    sig = inspect.signature(STRATEGIES[name].__init__)
    return {
        p.name: p.default for p in list(sig.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
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
    if name == AUTO:
        raise ComposerError(
            "strategy 'auto' is chosen per call from the prompt and its LoRAs: give it to "
            "ComposerPipeline (strategy='auto'), which records the strategy it used"
        )
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
