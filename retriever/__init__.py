"""Catalog of a LoRA library and prompt -> ranked adapters (lexical, text, preview and weight signals).

from lora_composer.retriever import Catalog, retriever_for
Catalog.for_library("~/loras").index()                 # incremental; LIBRARY/.lora-composer/catalog.sqlite
r = retriever_for(pipe, "~/loras")                       # pipe: a diffusers pipeline (its text encoder)
picks = r.select("a castle in pixel art", top_k=4)      # Selection: [Match], .left_out, .notice
for m in picks:
    print(m.name, m.span, m.weight, m.reason)           # the prompt span each pick covers, and why
"""

from __future__ import annotations

if __name__ == "retriever":  # top-level `retriever` from the repository root: not ours (see source_tree)
    from lora_composer.source_tree import defer_to_installed

    defer_to_installed(__name__, __file__)

from lora_composer.retriever.catalog import Catalog, IndexReport, default_catalog_path
from lora_composer.retriever.search import DEFAULT_MIN_SCORE, DEFAULT_TOP_K, Match, Retriever
from lora_composer.retriever.selection import Selection

__all__ = [
    "DEFAULT_MIN_SCORE",
    "DEFAULT_TOP_K",
    "Catalog",
    "IndexReport",
    "Match",
    "Retriever",
    "Selection",
    "default_catalog_path",
    "retriever_for",
    "search",
]

_CACHE: dict = {}


def retriever_for(
    pipe, library, catalog=None, update: bool = True, progress: bool = False, family: str | None = None
) -> Retriever:
    """A :class:`Retriever` over ``library``'s catalog for ``pipe``'s text encoder and ``family`` (default:
    the pipeline's), cached per pipeline and catalog. ``update`` first brings the catalog up to date (incremental, cheap when nothing
    changed)."""
    from pathlib import Path

    from lora_composer.retriever.encoder import TextEncoder
    from lora_composer.retriever.signals import learned as learned_mod
    from lora_composer.retriever.signals import preview as preview_mod

    path = Path(catalog) if catalog is not None else default_catalog_path(library)
    key = (id(pipe), str(path.resolve()) if path.exists() else str(path), family)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not pipe:
        cat = Catalog(path, root=library)
        enc = TextEncoder(pipe)
        cat.encoder_mean(enc)
        learned = learned_mod.load_for(cat, library, enc) if learned_mod.enabled() else None
        preview = preview_mod.load_available()
        hit = (pipe, Retriever(cat, enc, family=family, learned=learned, preview=preview))
        _CACHE[key] = hit
    retriever = hit[1]
    if update and library is not None:
        retriever.catalog.index(library, progress=progress)
    return retriever


def search(catalog: Catalog, prompt: str, k: int = 10, pipe=None, encoder=None) -> list[Match]:
    """``[Match]`` for ``prompt`` in ``catalog``, best first (``pipe`` or ``encoder`` gives the text space)."""
    from lora_composer.retriever.encoder import TextEncoder

    enc = encoder or TextEncoder(pipe)
    catalog.encoder_mean(enc)
    return Retriever(catalog, enc).search(prompt, limit=k)
