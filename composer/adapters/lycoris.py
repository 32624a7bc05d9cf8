"""Kept for imports written before the kinds package: the names now live in :mod:`.kinds`."""

from __future__ import annotations

from .kinds import EPS32, NOT_LOADED, KindError, kohya_delta, kohya_suffixes, peft_delta, peft_suffixes

KOHYA_SUFFIXES = tuple(sorted(kohya_suffixes()))
PEFT_SUFFIXES = peft_suffixes()

__all__ = ["EPS32", "KOHYA_SUFFIXES", "NOT_LOADED", "PEFT_SUFFIXES", "KindError", "kohya_delta", "peft_delta"]
