"""AUTOMATIC1111 extra-network prompt syntax: ``<lora:name>``, ``<lora:name:0.8>``, ``<lora:name:te:unet>``.

A1111's rules are followed exactly: the first number is the text-encoder multiplier (default 1.0), the
second the UNet multiplier (default: the text-encoder one); the named form ``<lora:name:te=0.5:unet=0.8>``
overrides either. ``<lyco:...>`` (the LyCORIS extension's tag) is read as an alias of ``<lora:...>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lora_composer.errors import ComposerError
from lora_composer.vocab import DEFAULT_LORA_WEIGHT

# A1111's extra-network regex is ``<(\w+):([^>]+)>``; only our kinds are taken out of the prompt, other
# extra networks (``<hypernet:...>``) are left in place.
_TAG_RE = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)
# what is left of a tag once the closed ones are out: ``<lora:name`` without its ``>``
_OPEN_RE = re.compile(r"<(?:lora|lyco):[^<>]*", re.IGNORECASE)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA asked for by name (or path) with its text-encoder and UNet weights."""

    name: str
    te_weight: float = DEFAULT_LORA_WEIGHT
    unet_weight: float = DEFAULT_LORA_WEIGHT

    @property
    def tag(self) -> str:
        return format_lora_tag(self.name, self.te_weight, self.unet_weight)


def format_weight(w: float) -> str:
    """``0.8`` -> ``0.8``, ``1.0`` -> ``1``: the shortest text that reads back as the same float."""
    text = repr(float(w))
    return text[:-2] if text.endswith(".0") else text


def format_lora_tag(name: str, te_weight: float = 1.0, unet_weight: float | None = None) -> str:
    """The A1111 tag for a LoRA: ``<lora:name:0.8>``, or ``<lora:name:te:unet>`` when the two differ."""
    unet_weight = te_weight if unet_weight is None else unet_weight
    if float(te_weight) == float(unet_weight):
        return f"<lora:{name}:{format_weight(te_weight)}>"
    return f"<lora:{name}:{format_weight(te_weight)}:{format_weight(unet_weight)}>"


def _number(text: str, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ComposerError(f"bad weight {text.strip()!r} in {where}: expected a number such as 0.8") from None
    if not math.isfinite(value):
        raise ComposerError(f"bad weight {text.strip()!r} in {where}: must be a finite number")
    return value


def parse_tag_body(kind: str, body: str, where: str | None = None) -> LoraRef:
    """Parse what follows ``<lora:`` in a tag (``name:0.8``, ``name:te=0.5:unet=1``...)."""
    where = where or f"<{kind}:{body}>"
    parts = body.split(":")
    name = parts[0].strip()
    if not name:
        raise ComposerError(f"missing LoRA name in {where}")
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key not in ("te", "unet"):
                raise ComposerError(f"unsupported parameter {key!r} in {where}: use te= and unet=")
            named[key] = value
        elif named:
            raise ComposerError(f"positional weight after a named one in {where}")
        else:
            positional.append(part)
    if len(positional) > 2:
        raise ComposerError(f"too many weights in {where}: use <{kind}:name:w> or <{kind}:name:te:unet>")
    te = _number(positional[0], where) if positional else DEFAULT_LORA_WEIGHT
    if "te" in named:
        te = _number(named["te"], where)
    unet = _number(positional[1], where) if len(positional) > 1 else te
    if "unet" in named:
        unet = _number(named["unet"], where)
    return LoraRef(name, te, unet)


def tidy_prompt(text: str) -> str:
    """Collapse the spaces and commas a removed tag leaves behind (``"a, <lora:x>, b"`` -> ``"a, b"``)."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +,", ",", text)  # "a , b" -> "a, b"
    text = re.sub(r",(\s*,)+", ",", text)  # empty comma-separated items
    lines = [line.strip(" ,") for line in text.split("\n")]
    return "\n".join(lines).strip(" ,\n")


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """Take the ``<lora:...>``/``<lyco:...>`` tags out of ``prompt``.

    Returns the tidied prompt and the references in order of appearance (duplicates are kept: the
    caller decides). A malformed tag, or one left unclosed (``<lora:name`` without ``>``), raises
    :class:`ComposerError` naming it.
    """
    refs: list[LoraRef] = []

    def take(match: re.Match) -> str:
        refs.append(parse_tag_body(match.group(1).lower(), match.group(2), where=match.group(0)))
        return " "

    clean = _TAG_RE.sub(take, prompt)
    unclosed = _OPEN_RE.search(clean)
    if unclosed:
        shown = unclosed.group(0).rstrip()
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ComposerError(
            f"unclosed tag {shown!r} in the prompt: end it with '>', as in <lora:NAME> or <lora:NAME:0.8>"
        )
    if not refs:
        return prompt.strip(), []
    return tidy_prompt(clean), refs


def with_tag_names(prompt: str, names: list[str]) -> str:
    """``prompt`` with its tags' names replaced by ``names``, in order, weights and places kept (a UI resolves
    library names to files this way for prompts whose tags must stay where they are)."""
    refs = iter(names)

    def rename(match: re.Match) -> str:
        ref = parse_tag_body(match.group(1).lower(), match.group(2), where=match.group(0))
        return format_lora_tag(next(refs), ref.te_weight, ref.unet_weight)

    return _TAG_RE.sub(rename, prompt)


def find_tags(prompt: str) -> list[str]:
    """Names of the LoRA tags in ``prompt``, without validating their weights."""
    return [m.group(2).split(":")[0].strip() for m in _TAG_RE.finditer(prompt)]


def parse_lora_spec(spec: str) -> LoraRef:
    """A command-line LoRA: ``PATH_OR_NAME``, ``PATH_OR_NAME:W`` or ``PATH_OR_NAME:TE:UNET``.

    Weights are read from the right, so paths containing ``:`` still work when they end with a file
    name (``C:\\loras\\x.safetensors``).
    """
    where = f"--lora {spec}"
    parts = spec.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        last = parts[-1].strip()
        try:
            value = float(last)
        except ValueError:
            if weights or "/" in last or "\\" in last or "." in last:
                break  # a path component, not a weight
            raise ComposerError(f"bad weight {last!r} in {where}: expected NAME, NAME:W or NAME:TE:UNET") from None
        if not math.isfinite(value):
            raise ComposerError(f"bad weight {last!r} in {where}: must be a finite number")
        weights.insert(0, value)
        parts.pop()
    name = ":".join(parts).strip()
    if not name:
        raise ComposerError(f"missing LoRA name or path in {where}")
    if not weights:
        return LoraRef(name, DEFAULT_LORA_WEIGHT, DEFAULT_LORA_WEIGHT)
    if len(weights) == 1:
        return LoraRef(name, weights[0], weights[0])
    return LoraRef(name, weights[0], weights[1])


# Regional Prompter's keywords (A1111 extension), upper case as there: ``BREAK`` separates regions and text
# before ``ADDCOMM`` is common to every region.
_BREAK_RE = re.compile(r"\bBREAK\b")
_COMMON_RE = re.compile(r"\bADDCOMM\b")


def has_regions(prompt: str) -> bool:
    """Whether ``prompt`` is split into regions (a ``BREAK`` in it)."""
    return bool(_BREAK_RE.search(prompt))


def split_regions(prompt: str) -> tuple[str, list[str]]:
    """``"COMMON ADDCOMM LEFT BREAK RIGHT"`` -> ``("COMMON", ["LEFT", "RIGHT"])`` (tags left in place).

    The regional prompt syntax of the Regional Prompter extension: regions in reading order (left to right,
    or top to bottom), ``ADDCOMM`` at most once. An empty region raises :class:`ComposerError`.
    """
    parts = _COMMON_RE.split(prompt)
    if len(parts) > 2:
        raise ComposerError("ADDCOMM appears more than once in the prompt: put the common text once, before it")
    common, body = (parts[0].strip(" ,\n"), parts[1]) if len(parts) == 2 else ("", parts[0])
    regions = [r.strip(" ,\n") for r in _BREAK_RE.split(body)]
    for i, text in enumerate(regions):
        if not text:
            raise ComposerError(
                f"region {i + 1} of {len(regions)} in the prompt is empty: write its text between the BREAKs"
            )
    return common, regions
