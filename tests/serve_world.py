"""The mini world loaded once for the serving tests (two pipelines: one serves, one renders the solo reference)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def pipelines():
    from lora_composer.default_model import ensure_default_model
    from lora_composer.pipeline import ComposerPipeline

    model, library = ensure_default_model()
    return (
        ComposerPipeline.from_pretrained(model, library=library),
        ComposerPipeline.from_pretrained(model, library=library),
        library,
    )
