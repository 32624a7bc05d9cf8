"""``--strategy auto``: regional for regions, the best measured in the model's world, merge elsewhere; the server
and the front ends resolve it the same way."""

from __future__ import annotations

import pytest

from lora_composer import measured
from lora_composer.errors import ComposerError
from lora_composer.fusion.registry import AUTO, choices, get_strategy, resolve_auto


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """A one-object record where tsv beats merge at 4 LoRAs and ties it at 3."""
    monkeypatch.setattr(measured, "RESULTS", tmp_path)
    measured.runs.cache_clear()
    summary = lambda r3, r4: {"images": 20, "by_size": {"3": r3, "4": r4}, "base_confidence": 0.95}  # noqa: E731
    measured.record(
        tmp_path / "one-object.json",
        {"protocol": {"seed": 11}, "strategies": {"merge": summary(0.5, 0.2), "tsv": summary(0.5, 0.4)}},
        "compose eval ...",
        "one-object",
    )
    yield
    measured.runs.cache_clear()


def test_resolve_auto(recorded):
    assert resolve_auto("a star BREAK a cross", 2, "one-object")[0] == "regional"
    assert resolve_auto("a star", 3, "one-object")[0] == "merge"  # a tie goes to merge
    assert resolve_auto("a star", 4, "one-object")[0] == "tsv"
    assert resolve_auto("a star", 4, "")[0] == "merge"  # a model no world measured
    assert AUTO in choices() and AUTO not in [c for c in choices()[1:]]
    with pytest.raises(ComposerError, match="chosen per call"):
        get_strategy(AUTO)


def test_the_server_resolves_auto_before_queueing(recorded, tmp_path):
    from lora_composer.serving.requests import GenerateBody, LibraryNames, Limits, RequestError, to_spec

    library = tmp_path / "loras"
    library.mkdir()
    for name in ("a", "b", "c", "d"):
        (library / f"{name}.safetensors").write_bytes(b"")

    class Composer:  # what to_spec reads from the pipeline
        world = "one-object"
        default_guidance = 5.0

        def size_rules(self):
            return 8, (64, 64)

        class pipe:
            scheduler = object()

    names, limits, strategies = LibraryNames(library), Limits(), {"merge", "tsv", "regional"}
    loras = [{"name": n, "weight": 1.0} for n in "abcd"]
    spec = to_spec(GenerateBody(prompt="a star", loras=loras, strategy="auto"), names, limits, Composer(), strategies)
    assert spec.strategy == "tsv"
    spec = to_spec(
        GenerateBody(prompt="a star", loras=loras[:3], strategy="auto"), names, limits, Composer(), strategies
    )
    assert spec.strategy == "merge"
    spec = to_spec(
        GenerateBody(prompt="a <lora:a> BREAK b <lora:b>", strategy="auto"), names, limits, Composer(), strategies
    )
    assert spec.strategy == "regional"
    with pytest.raises(RequestError, match="auto takes no arguments"):
        to_spec(
            GenerateBody(prompt="a", strategy="auto", strategy_args={"every": 2}), names, limits, Composer(), strategies
        )


def test_help_and_web_ui_offer_auto():
    from lora_composer.frontends import ui
    from lora_composer.frontends.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "combined: auto, " in text and " auto regional when the prompt has BREAK regions" in text
    assert ui._params_text(AUTO).startswith("`auto`: regional when")


def test_the_pipeline_resolves_auto_and_records_the_strategy_used(recorded):
    """On the mini world (its model folder names the one-object world): 4 LoRAs -> tsv, 3 -> merge (a tie),
    regions -> regional; the image records what ran and ``last_auto`` says why."""
    from lora_composer.default_model import ensure_default_model
    from lora_composer.pipeline import ComposerPipeline

    model, library = ensure_default_model()
    composer = ComposerPipeline.from_pretrained(str(model), library=str(library))
    assert composer.world == "one-object"
    call = dict(num_inference_steps=1, seed=3, progress=False)
    four = ["star-shape", "purple-colour", "checkered-bg", "outline-style"]
    composer("a star", loras=four, strategy="auto", **call)
    assert composer.last_record.strategy == "tsv" and "one-object world at 4 LoRAs" in composer.last_auto
    composer("a star", loras=four[:3], strategy="auto", **call)
    assert composer.last_record.strategy == "merge"
    composer("a star <lora:star-shape> BREAK a cross <lora:purple-colour>", strategy="auto", **call)
    assert composer.last_record.strategy == "regional"
    with pytest.raises(ComposerError, match="takes no arguments"):
        composer("a star", loras=four, strategy="auto", strategy_args={"every": 2}, **call)
