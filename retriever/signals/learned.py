"""Learned weight encoder (AutoLoRA-style): not built yet.

Planned: probe inputs through each layer's delta, a per-layer projection, a small transformer pooling the
layers to one embedding in the text-encoder space, trained with symmetric InfoNCE against the description
embeddings of the catalog's described adapters (``compose train-retriever``), saved in the library's
``.lora-composer`` folder. :class:`retriever.search.Retriever` already reserves a matrix block and a fusion
weight for it; until a model exists :func:`load_for` returns None and the signal is absent.
"""

from __future__ import annotations


def load_for(catalog, library, encoder):
    """The trained encoder for this library and text encoder, or None (none is trained yet)."""
    return None
