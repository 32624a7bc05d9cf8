"""What strategies measured: the record files ``compose eval --record`` writes, and the lines read from them."""

from __future__ import annotations

import json

import pytest

from lora_composer import measured
from lora_composer.fusion.registry import STRATEGIES


def _result(seed: int, images: int, **rates) -> dict:
    """A ``results.json`` dict with one summary per strategy: ``name=(rate at 3, rate at 4)``."""
    return {
        "protocol": {"seed": seed, "sizes": [3, 4]},
        "strategies": {
            name: {"images": images, "by_size": {"3": r3, "4": r4}, "by_combination": {"a+b": [1, 2]}}
            for name, (r3, r4) in rates.items()
        },
    }


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "RESULTS", tmp_path)
    measured.runs.cache_clear()
    yield tmp_path
    measured.runs.cache_clear()


def test_a_recorded_run_is_quoted_beside_merge_from_the_same_run(results):
    measured.record(
        results / "community.json",
        _result(3000, 20, merge=(0.40, 0.25), switch=(0.30, 0.10)),
        "compose eval --world community --seed 3000",
        "community",
    )
    measured.record(
        results / "community.json",
        _result(1000, 8, merge=(0.90, 0.90), switch=(0.99, 0.99)),
        "compose eval --world community --seed 1000 --combos 4",
        "community",
    )
    data = json.loads((results / "community.json").read_text())
    assert [r["seed"] for r in data["runs"]] == [3000, 1000]
    assert "by_combination" not in data["runs"][0]["strategies"]["merge"]  # the summary only
    # the run with the most pictures of the strategy wins, and its own merge figures are quoted
    assert (
        measured.line("switch")
        == "community world, seed 3000, 20 pictures: all concepts 0.30 / 0.10 at 3 / 4 LoRAs (merge 0.40 / 0.25)"
    )
    assert measured.line("merge") == "community world, seed 3000, 20 pictures: all concepts 0.40 / 0.25 at 3 / 4 LoRAs"
    assert measured.line("ties") == "not measured on the mini worlds yet"


def test_every_world_recorded_is_quoted_in_order(results):
    measured.record(results / "community.json", _result(3000, 5, merge=(0.4, 0.2)), "c", "community")
    measured.record(results / "one-object.json", _result(3000, 5, merge=(0.5, 0.3)), "o", "one-object")
    assert measured.line("merge").split("; ") == [
        "one-object world, seed 3000, 5 pictures: all concepts 0.50 / 0.30 at 3 / 4 LoRAs",
        "community world, seed 3000, 5 pictures: all concepts 0.40 / 0.20 at 3 / 4 LoRAs",
    ]
    with pytest.raises(ValueError, match="records the 'community' world"):
        measured.record(results / "community.json", _result(1, 1, merge=(0, 0)), "x", "one-object")


def test_best_picks_the_highest_rate_with_merge_winning_a_tie(results):
    measured.record(
        results / "community.json",
        _result(3000, 40, merge=(0.4, 0.2), switch=(0.4, 0.1), tsv=(0.1, 0.3)),
        "c",
        "community",
    )
    assert measured.best("community", 3, ["merge", "switch", "tsv"]) == "merge"
    assert measured.best("community", 4, ["merge", "switch", "tsv"]) == "tsv"
    assert measured.best("community", 4, ["switch"]) == "switch"
    assert measured.best("one-object", 4, ["merge"]) is None
    measured.record(results / "two.json", _result(1, 4, merge=(0.5, 0.5), tsv=(1.0, 1.0)), "t", "two")
    assert measured.best("two", 3, ["merge", "tsv"]) == "merge"  # a one-picture lead (2 per size) is noise
    over = _result(1, 5, merge=(0.4, 0.2), marginal=(0.9, 0.9))
    over["strategies"]["merge"]["base_confidence"], over["strategies"]["marginal"]["base_confidence"] = 0.95, 0.5
    measured.record(results / "one-object.json", over, "o", "one-object")
    assert measured.best("one-object", 3, ["merge", "marginal"]) == "merge"  # it loses the base's own concepts


def test_strategies_read_their_line_from_the_records(results):
    measured.record(results / "one-object.json", _result(7, 5, merge=(0.5, 0.3), klora=(0.1, 0.05)), "o", "one-object")
    assert (
        STRATEGIES["klora"].measured
        == "one-object world, seed 7, 5 pictures: all concepts 0.10 / 0.05 at 3 / 4 LoRAs (merge 0.50 / 0.30)"
    )
    assert STRATEGIES["klora"]().measured == STRATEGIES["klora"].measured


def test_auto_picks_regional_for_regions_else_the_best_measured_else_merge(results):
    measured.record(results / "community.json", _result(3000, 40, merge=(0.4, 0.2), tsv=(0.1, 0.3)), "c", "community")
    names = ["merge", "tsv", "switch"]
    assert measured.auto("community", 2, True, names)[0] == "regional"
    assert measured.auto("community", 3, False, names)[0] == "merge"
    assert measured.auto("community", 6, False, names) == (
        "tsv",
        "the best in the community world at 4 LoRAs (seed 3000)",
    )
    assert measured.auto("", 4, False, names)[0] == "merge"  # a model no world measured
    assert measured.auto("community", 1, False, names)[0] == "merge"


def test_the_shipped_records_quote_every_strategy():
    """The package's record files (what ``--help`` and the web UI show) name every strategy of the registry."""
    measured.runs.cache_clear()
    missing = [name for name in STRATEGIES if measured.line(name) == "not measured on the mini worlds yet"]
    assert not missing, f"no recorded run measured {missing}: run compose eval --record composer/results/<world>.json"
