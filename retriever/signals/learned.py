"""Learned weight encoder (AutoLoRA-style); filled in below."""

from __future__ import annotations


def load_for(catalog, library, encoder):
    return None
