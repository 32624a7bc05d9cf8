"""The two-object mini world: drawing, captions, bleeding-aware scoring, the shipped pipeline, the CLI flag."""

from __future__ import annotations

import numpy as np
import pytest

from lora_composer.miniworld import assets, two_objects, world
from lora_composer.miniworld.two_objects import Pair


@pytest.fixture(scope="module")
def detector():
    from lora_composer.miniworld.detectors import load_detector

    return load_detector(assets.detector_path())


def test_each_half_is_an_in_distribution_one_object_picture(detector):
    acc = two_objects.detector_on_halves(detector, n=120, seed=5)
    for side in two_objects.SIDES:
        for cat, a in acc[side].items():
            assert a >= 0.97, (side, cat, a)
    images, _, pairs = two_objects.sample(np.random.default_rng(1), 3)
    assert images.shape == (3, 64, 128, 3)
    assert all(p.left.background == p.right.background for p in pairs)


def test_caption_names_each_object_with_its_side_in_the_world_grammar():
    left = world.Scene("star", "purple", "wavy", "outline", "blinky")
    right = world.Scene("circle", "red", "wavy", "outline", "smiley")
    assert two_objects.caption(Pair(left, right)) == (
        "blinky, a purple star on the left and a red circle with a smiley face on the right, on a wavy background, "
        "outline style"
    )
    plain = Pair(world.Scene("circle", "red", "striped"), world.Scene("square", "blue", "striped", character="blinky"))
    assert two_objects.caption(plain) == (
        "a red circle on the left and blinky, a blue square on the right, on a striped background"
    )
    with pytest.raises(ValueError, match="share the background"):
        Pair(world.Scene("circle", "red", "plain"), world.Scene("square", "red", "dotted"))
    rng = np.random.default_rng(0)
    for _ in range(20):  # dropout never loses a shape or the sides
        text = two_objects.caption(plain, rng, drop=0.9)
        assert "circle on the left" in text and "square on the right" in text


def test_regional_prompt_describes_each_half_in_its_region_with_its_loras():
    from lora_composer.miniworld.library import LORAS
    from lora_composer.prompt_syntax import parse_prompt, split_regions

    spec = {s.value: s for s in LORAS}
    combo = (("left", spec["star"]), ("left", spec["purple"]), ("right", spec["blinky"]), ("both", spec["wavy"]))
    pair = two_objects.pair_for(combo, np.random.default_rng(0))
    prompt, loras = two_objects.regional_prompt(pair, combo)
    common, regions = split_regions(prompt)
    assert common == "" and loras == [("wavy-bg", 1.0)]
    texts = [parse_prompt(r) for r in regions]
    assert [t for t, _ in texts] == [world.caption(pair.left), world.caption(pair.right)]
    assert [[r.name for r in refs] for _, refs in texts] == [["star-shape", "purple-colour"], ["blinky-character"]]
    assert texts[0][0].startswith("a purple star") and texts[1][0].startswith("blinky, a ")


def test_a_concept_found_on_the_other_half_is_a_failure():
    wanted = {"left": {"shape": "star", "background": "wavy"}, "right": {"colour": "purple", "background": "wavy"}}
    clean = {
        "left": {"shape": "star", "colour": "red", "background": "wavy"},
        "right": {"shape": "circle", "colour": "purple", "background": "wavy"},
    }
    assert two_objects.score(wanted, clean)["ok"]
    bled = {"left": {"shape": "star", "colour": "purple", "background": "wavy"}, "right": clean["right"]}
    r = two_objects.score(wanted, bled)
    assert not r["ok"] and r["bled"] and all(r["hits"].values())
    assert r["bleeds"] == {("left", "shape", "star"): False, ("right", "colour", "purple"): True}
    missing = {"left": clean["left"], "right": {"shape": "circle", "colour": "red", "background": "wavy"}}
    assert not two_objects.score(wanted, missing)["ok"] and not two_objects.score(wanted, missing)["bled"]
    t = two_objects.Tally()
    t.add(two_objects.score(wanted, clean), "1+1+bg")
    t.add(r, "1+1+bg")
    s = t.summary()
    assert (s["all_concepts"], s["bleeding"], s["bleed"]["purple"], s["concepts"]["purple"]) == (0.5, 0.5, 0.5, 1.0)


def test_combinations_split_the_loras_across_the_objects():
    combos = two_objects.combinations()
    for combo in combos["2+1"]:
        sides = [s for s, _ in combo]
        assert len(combo) == 3 and sorted(sides.count(s) for s in two_objects.SIDES) == [1, 2]
    for combo in combos["1+1+bg"]:
        assert [s for s, _ in combo] == ["left", "right", "both"] and combo[2][1].category == "background"
    pair = two_objects.pair_for(combos["1+1+bg"][0], np.random.default_rng(0))
    assert pair.left.shape != pair.right.shape or combos["1+1+bg"][0][0][1].category == "shape"


def test_the_shipped_two_object_pipeline_renders_128x64():
    pipe = two_objects.load_pipeline()
    images = pipe(
        "a red circle on the left and a blue square on the right, on a plain background",
        seed=0,
        num_inference_steps=2,
        height=two_objects.HEIGHT,
        width=two_objects.WIDTH,
        progress=False,
    )
    assert images[0].size == (128, 64)
    assert (assets.two_objects_dir() / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_compose_eval_refuses_an_unknown_world_in_one_line(capsys):
    from lora_composer.frontends.evaluate import main

    assert main(["--world", "three-objects"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "three-objects" in err and "two-objects" in err


def test_compose_eval_two_objects_writes_the_table_and_an_example_grid(tmp_path, capsys):
    """One combination per kind, one step: the table, results.json and a grid of 128x64 cells (one row per
    strategy); regional's rows are twice merge's."""
    import json

    from PIL import Image

    from lora_composer.frontends.evaluate import main

    out = tmp_path / "out"
    argv = [
        "--world",
        "two-objects",
        "--per-kind",
        "1",
        "--steps",
        "1",
        "--strategies",
        "merge",
        "regional",
        "--no-checks",
        "--out",
        str(out),
        "-q",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| regional |" in table and "the one-object base" in table
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"]["base"] == "one-object" and result["protocol"]["loras"] == "by hand"
    rows = {name: s["rows_per_image"] for name, s in result["strategies"].items()}
    assert rows["regional"] == 2 * rows["merge"]
    grid = Image.open(out / "grid.png")
    assert grid.size == (90 + 2 * 2 * two_objects.WIDTH, 60 + 2 * 2 * two_objects.HEIGHT)
