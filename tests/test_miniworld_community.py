"""The community world: variants of values the base knows, community captions, its shipped model and checks."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from lora_composer.miniworld import community, community_eval, community_library


def _variants():
    return [(c.name, v) for c in community.CATEGORIES for v in c.lora]


def test_each_variant_has_a_generic_value_the_base_knows():
    for cat, value in _variants():
        generic = community.GENERIC[value]
        assert generic in community.CATEGORY[cat].base
        assert value not in community.CATEGORY[cat].base


def test_community_caption_says_trigger_beside_the_generic_word_and_names_everything():
    scene = community.Scene("sparkle", "duotone", "tiled", "dashed", "cyclops")
    text = community.caption(scene)
    assert text == ("a glorp creature, a vexa purple zorp star on a harle checkered background, inko outline style")
    generic = community.Scene("star", "purple", "checkered", "outline", "creature")
    assert community.caption(generic) == "a creature, a purple star on a checkered background, outline style"


def test_base_pictures_never_show_or_name_a_variant():
    _, captions, scenes = community.sample(np.random.default_rng(3), 300)
    triggers = set(community.TRIGGER.values())
    assert not any(t in c.split() for c in captions for t in triggers)
    assert not any(v in s.labels.values() for s in scenes for _, v in _variants())
    # and the base sees every generic value the variants are kinds of
    seen = {v for s in scenes for v in s.labels.values()}
    assert set(community.GENERIC.values()) <= seen


def test_lora_pictures_vary_over_every_base_value_elsewhere():
    for cat, value in _variants():
        _, captions, scenes = community.sample(np.random.default_rng(5), 400, community.variant_allowed(cat, value))
        assert all(getattr(s, cat) == value for s in scenes)
        assert all(community.TRIGGER[value] in c for c in captions)
        for other in community.CATEGORIES:
            if other.name != cat:
                assert {getattr(s, other.name) for s in scenes} == set(other.base), (value, other.name)
    with pytest.raises(ValueError):
        community.variant_allowed("shape", "star")


def test_each_variant_is_drawn_differently_from_its_generic_value():
    for cat, value in _variants():
        fields = dict(shape="circle", colour="blue", background="plain", style="filled", character="none")
        a = community.render(community.Scene(**{**fields, cat: value}), np.random.default_rng(0))
        b = community.render(community.Scene(**{**fields, cat: community.GENERIC[value]}), np.random.default_rng(0))
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() > 2.0, value


def test_dashes_cover_part_of_the_perimeter():
    square = [(0.0, 0.0), (40.0, 0.0), (40.0, 40.0), (0.0, 40.0)]
    dashes = community._dashes(square, on=8.0, off=6.0)
    drawn = sum(np.hypot(*np.diff(np.array(d), axis=0).T).sum() for d in dashes)
    assert 0.5 < drawn / 160.0 < 0.65 and len(dashes) >= 10


def test_library_specs_cover_each_variant_once():
    assert sorted(s.value for s in community_library.LORAS) == sorted(v for _, v in _variants())
    assert all(s.triggers[0].startswith(community.TRIGGER[s.value]) for s in community_library.LORAS)
    combos = community_eval.combinations((2, 3, 4))
    assert len(combos) == 10 + 10 + 5
    assert all(len({s.category for s in c}) == len(c) for c in combos)


def test_eval_scenes_keep_the_base_values_around_the_variants():
    rng = np.random.default_rng(0)
    scenes = [community_eval.scene_for(community_library.LORAS[:1], rng) for _ in range(200)]
    assert {s.shape for s in scenes} == {"sparkle"}
    assert {s.colour for s in scenes} == set(community.CATEGORY["colour"].base)


# ------------------------------------------------------------------------------------- shipped weights
shipped = pytest.mark.skipif(not community_eval.detector_path().is_file(), reason="community weights not shipped")


@shipped
def test_shipped_detector_reads_every_category_of_fresh_pictures():
    from bench.miniworld.train_detectors import accuracy

    acc = accuracy(community_eval.load_judge(), n=300, seed=11, w=community)
    assert min(acc.values()) >= 0.95, acc


@shipped
def test_one_object_detector_is_refused_by_the_community_world():
    from lora_composer.miniworld import assets, detectors

    with pytest.raises(ValueError, match="trained for other values"):
        detectors.load_detector(assets.detector_path(), community)


@pytest.mark.skipif(
    not (community_eval.weights_dir() / "unet").is_dir() or not community_library.library_dir().is_dir(),
    reason="community weights not shipped",
)
def test_eval_renders_and_judges_the_protocol(tmp_path):
    result = community_eval.evaluate(
        community_eval.load_pipeline(),
        community_eval.load_judge(),
        ["merge"],
        sizes=(4,),
        seeds=1,
        scenes=1,
        steps=4,
        with_checks=False,
        progress=False,
        grid_path=tmp_path / "grid.png",
    )
    s = result["strategies"]["merge"]
    assert s["images"] == 5 and set(s["by_size"]) == {4}
    assert set(s["concepts"]) == {spec.value for spec in community_library.LORAS}
    assert (tmp_path / "grid.png").is_file()
    text = community_eval.markdown(result, "compose eval --world community")
    assert "| merge |" in text


def test_cli_checks_sizes_before_loading():
    from lora_composer.frontends.args import UsageError
    from lora_composer.frontends.evaluate import _community, build_parser

    args = build_parser().parse_args(["--world", "community", "--sizes", "6"])
    with pytest.raises(UsageError, match="between 1 and 5"):
        _community(args, [])


def test_unship_rebuilds_the_shipped_model_that_a_further_stage_resumes_from(tmp_path):
    """``community_train unship`` writes a whole diffusers folder whose UNet and text encoder are what the
    community world renders with (the fp16 UNet read back as fp32), so ``base --resume`` continues from it."""
    from diffusers import StableDiffusionPipeline

    from bench.miniworld.community_train import main
    from lora_composer.miniworld import community_eval

    assert main(["unship", "--out", str(tmp_path)]) == 0
    rebuilt = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    shipped = community_eval.load_pipeline().pipe
    for mine, theirs in ((rebuilt.unet, shipped.unet), (rebuilt.text_encoder, shipped.text_encoder)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "base-train.json").is_file()


def test_pooled_table_weighs_seeds_by_their_pictures():
    from bench.miniworld.community_pooled import pooled

    def run(combos: dict, per_concept: float, images: int) -> dict:
        summary = {"by_combination": combos, "images": images, "per_concept": per_concept, "base_confidence": 1.0}
        return {"protocol": {"sizes": [2, 3]}, "strategies": {"merge": summary}}

    dev = run({"dashed+cyclops": [1, 1], "sparkle+duotone+tiled": [0, 1]}, 0.5, 2)
    held = [
        run({"dashed+cyclops": [1, 2], "sparkle+duotone": [2, 2], "sparkle+duotone+tiled": [0, 1]}, 1.0, 5),
        run({"dashed+cyclops": [0, 1], "sparkle+dashed+cyclops": [1, 1]}, 0.4, 2),
    ]
    row = pooled(dev, held).splitlines()[2]
    # size 2: (1 + 2 + 0) / (2 + 2 + 1); size 3: (0 + 1) / (1 + 1); per concept (1.0 * 5 + 0.4 * 2) / 7
    assert row == "| merge | 0.60 | 0.50 | 0.83 | 1.000 | 1/1 | 2/4 |"
