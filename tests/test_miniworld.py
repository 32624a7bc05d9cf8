"""The mini world: scenes, captions, LoRA specs and files, the evaluation protocol's bookkeeping, and the
development tools beside it (bench/miniworld/: training, LoRA files, docs/EVAL.md's tables)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from lora_composer.miniworld import evaluate, library, world


def test_scenes_are_seeded_and_labelled():
    a_img, a_cap, a_sc = world.sample(np.random.default_rng(3), 6)
    b_img, b_cap, b_sc = world.sample(np.random.default_rng(3), 6)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    assert a_img.shape == (6, 64, 64, 3) and a_img.dtype == np.uint8
    for scene, cap in zip(a_sc, a_cap):
        assert all(v in world.CATEGORY[c].base for c, v in scene.labels.items())  # default: base values only
        assert scene.shape in cap and scene.colour in cap and scene.background in cap


def test_every_value_draws_a_different_picture():
    """Changing one category's value changes the pixels (same position and size: same rng state)."""
    base = world.Scene("circle", "red", "plain")
    ref = np.asarray(world.render(base, np.random.default_rng(0)))
    for cat in world.CATEGORIES:
        for value in cat.values:
            if value == getattr(base, cat.name):
                continue
            other = world.Scene(**{**base.labels, cat.name: value})
            assert not np.array_equal(np.asarray(world.render(other, np.random.default_rng(0))), ref), value


def test_lora_values_only_when_allowed():
    rng = np.random.default_rng(0)
    _, caps, scenes = world.sample(rng, 40, world.concept_allowed("colour", "purple"), drop=0.5, keep="colour")
    assert all(s.colour == "purple" for s in scenes) and all("purple" in c for c in caps)
    assert all(s.shape in world.CATEGORY["shape"].base for s in scenes)
    _, _, scenes = world.sample(rng, 200)
    assert not any(s.lora_concepts() for s in scenes)
    with pytest.raises(ValueError):
        world.concept_allowed("colour", "star")


def test_caption_articles_and_phrases():
    s = world.Scene("cross", "orange", "wavy", "outline", "blinky")
    assert world.caption(s) == "blinky, an orange cross on a wavy background, outline style"
    s = world.Scene("square", "red", "dotted", "filled", "smiley")
    assert world.caption(s) == "a red square with a smiley face on a dotted background"


def test_every_lora_value_has_exactly_one_spec():
    taught = sorted((s.category, s.value) for s in library.LORAS)
    assert taught == sorted(world.LORA_CONCEPTS)
    assert len(library.LORAS) >= 8
    assert {s.kohya_keys for s in library.LORAS} == {True, False}
    assert {s.sidecar for s in library.LORAS} >= {"a1111", "civitai", None}
    assert any(s.preview for s in library.LORAS)


def test_combinations_are_one_lora_per_category():
    combos = evaluate.combinations((2, 3, 4))
    # Independent count: all subsets of the LoRAs of the given size whose categories are distinct.
    expected = [
        c for k in (2, 3, 4) for c in itertools.combinations(library.LORAS, k) if len({s.category for s in c}) == k
    ]
    assert sorted(tuple(s.name for s in c) for c in combos) == sorted(tuple(s.name for s in c) for c in expected)


def test_drawn_combinations_are_seeded_per_size_and_a_subset():
    combos = evaluate.combinations((2, 3))
    drawn = evaluate.draw(combos, 3, seed=1000)
    assert [len(c) for c in drawn].count(2) == 3 and [len(c) for c in drawn].count(3) == 3
    assert drawn == evaluate.draw(combos, 3, seed=1000)  # the same for every strategy and run with that seed
    assert drawn != evaluate.draw(combos, 3, seed=3000)
    order = [combos.index(c) for c in drawn]
    assert order == sorted(order)  # a subsequence of the full list
    assert evaluate.draw(combos, None) == combos and len(evaluate.draw(combos, 10**6)) == len(combos)
    with pytest.raises(ValueError, match="at least 1"):
        evaluate.draw(combos, 0)


def test_tally_rates():
    t = evaluate.Tally()
    wanted = {"shape": "star", "colour": "purple"}
    t.add(
        wanted,
        {"background": "plain"},
        {"shape": "star", "colour": "purple", "background": "plain"},
        {"background": 0.9},
    )
    t.add(
        wanted, {"background": "plain"}, {"shape": "star", "colour": "red", "background": "dotted"}, {"background": 0.3}
    )
    t.add({"shape": "cross"}, {}, {"shape": "circle"}, {})
    t.seconds = 2.0
    s = t.summary()
    assert s["all_concepts"] == round(1 / 3, 4)
    assert s["by_size"] == {2: 0.5, 1: 0.0}
    assert s["concepts"] == {"star": 1.0, "purple": 0.5, "cross": 0.0}
    assert s["per_concept"] == round((1.0 + 0.5 + 0.0) / 3, 4)
    assert s["base_confidence"] == pytest.approx(0.6)
    assert s["images_per_s"] == 1.5


def test_write_doc_replaces_only_its_section(tmp_path):
    from bench.miniworld.eval_doc import write_doc

    doc = tmp_path / "EVAL.md"
    doc.write_text("# Eval\n\nintro\n")
    write_doc(doc, "table one\n")
    write_doc(doc, "table two\n")
    text = doc.read_text()
    assert text.startswith("# Eval\n\nintro\n") and "table two" in text and "table one" not in text
    assert text.count("<!-- eval:results -->") == 1


def test_docs_tables_come_from_the_development_tool_not_compose_eval(tmp_path, capsys):
    """``compose eval`` edits no file but its outputs; the tool refuses what it cannot record, before rendering."""
    from bench.miniworld import eval_doc
    from lora_composer.frontends.cli import main

    doc = tmp_path / "EVAL.md"
    assert main(["eval", "--write-doc", str(doc), "-q"]) == 2
    assert "unrecognized arguments: --write-doc" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        eval_doc.main(["--doc", str(doc), "--world", "community", "-q"])
    assert exc.value.code == 2 and "one-object tables only" in capsys.readouterr().err
    assert eval_doc.main(["--doc", str(doc), "--no-such-option"]) == 2  # compose eval's own usage error
    assert "compose eval: error: unrecognized arguments: --no-such-option" in capsys.readouterr().err
    assert not doc.exists()


def test_written_lora_loads_with_its_metadata(tmp_path, sd15_pipe):
    """Both formats round-trip the trained factors; trigger words come from kohya metadata and sidecars."""
    from bench.miniworld.lora_files import write_lora
    from lora_composer import tiny
    from lora_composer.adapters import load_adapter

    model = tmp_path / "model"
    sd15_pipe.save_pretrained(model)
    layers = tiny.random_lora_layers(sd15_pipe, rank=4, seed=1)
    for spec in (library.LORA_BY_NAME["star-shape"], library.LORA_BY_NAME["wavy-bg"]):
        path = write_lora(model, tmp_path / "loras", spec, layers)
        adapter = load_adapter(path)
        assert adapter.metadata.source_format == ("kohya" if spec.kohya_keys else "diffusers")
        assert set(spec.triggers) <= set(adapter.metadata.trigger_words)
        tags = json.loads(adapter.metadata.file_metadata["ss_tag_frequency"])
        assert spec.triggers[0] in tags[f"10_{spec.value}"]
        key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        ours = next(d for k, d in adapter.deltas.items() if k.endswith(key))
        a, b = layers["unet"][f"{key}.lora_A.weight"], layers["unet"][f"{key}.lora_B.weight"]
        # Written in fp16 (as most shared LoRAs); alpha = rank: scale 1.
        torch.testing.assert_close(
            ours.scale * ours.up.float() @ ours.down.float(), b.half().float() @ a.half().float()
        )
    assert (tmp_path / "loras" / "star-shape.civitai.info").is_file()
    assert (tmp_path / "loras" / "wavy-bg.json").is_file()


def test_train_lora_steps_change_only_the_adapter(tmp_path, sd15_pipe):
    """A few training steps on a (tiny) base: LoRA factors come back for UNet and text encoder, base untouched."""
    from bench.miniworld import train

    model = tmp_path / "model"
    sd15_pipe.unet.register_to_config(sample_size=16)
    sd15_pipe.save_pretrained(model)
    before = {k: v.clone() for k, v in sd15_pipe.unet.state_dict().items()}
    layers = train.train_lora(model, "shape", "star", steps=2, batch=2, images=4)
    assert layers["unet"] and layers["text_encoder"]
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for comp in layers.values() for k in comp)
    assert any(v.abs().sum() > 0 for k, v in layers["unet"].items() if k.endswith("lora_B.weight"))
    from diffusers import UNet2DConditionModel

    reloaded = UNet2DConditionModel.from_pretrained(model / "unet").state_dict()
    assert all(torch.equal(reloaded[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def shipped():
    """The shipped model and detectors, wrapped as ``compose eval`` does."""
    from lora_composer.miniworld import assets
    from lora_composer.miniworld.detectors import load_detector
    from lora_composer.pipeline import ComposerPipeline

    pipe = ComposerPipeline.from_pretrained(assets.model_dir(), library=assets.library_dir())
    return evaluate.Evaluator(pipe, load_detector(assets.detector_path()), steps=12, seeds=2)


def test_shipped_model_keeps_the_mini_world_contract(shipped):
    """A small sample of the checks in docs/EVAL.md: the base model draws what it was taught and not the
    LoRA concepts; each LoRA alone draws its concept (the goals, on averages: few images per LoRA)."""
    checks = evaluate.sanity_checks(shipped, base_prompts=6, lora_prompts=2, seed=7)
    assert checks["base_on_base"]["per_concept"] >= 0.8, checks["base_on_base"]
    assert np.mean(list(checks["base_on_lora_concepts"].values())) < 0.1, checks["base_on_lora_concepts"]
    assert np.mean(list(checks["lora_alone"].values())) >= 0.8, checks["lora_alone"]


def test_eval_command_writes_results_and_grid(tmp_path, capsys):
    """``compose eval`` end to end on a narrow protocol: the table, results.json, the grid, and the doc section
    written by ``python -m bench.miniworld.eval_doc`` (which runs it)."""
    from bench.miniworld import eval_doc
    from lora_composer.frontends.cli import main

    doc = tmp_path / "EVAL.md"
    code = eval_doc.main(
        [
            "--doc",
            str(doc),
            "--sizes",
            "2",
            "--seeds",
            "1",
            "--steps",
            "2",
            "--strategies",
            "merge",
            "switch:every=2",
            "--no-checks",
            "--auto-combos",
            "1",
            "--out",
            str(tmp_path / "out"),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    n = len(evaluate.combinations((2,)))
    assert set(result["strategies"]) == {"merge", "switch:every=2"}  # a variant, measured under its spec
    assert all(s["images"] == n for s in result["strategies"].values())
    assert set(result["retrieval_recall_at_k"]) == {"2"}
    for rec in result["auto_vs_hand"]["sets"].values():  # one combination per size 1-4, both phrasings
        assert rec["prompts"] == 4 and rec["hand"]["images"] == rec["auto"]["images"] == 4
    assert (tmp_path / "out" / "grid.png").is_file() and "| merge |" in doc.read_text()
    assert "Command: `compose eval --sizes 2 --seeds 1 --steps 2" in doc.read_text()  # what the doc's numbers ran
    assert result["strategies"]["merge"]["rows_per_image"] == 2 * 2  # 2 steps x both halves of guidance
    table = [line.split(" | ") for line in doc.read_text().splitlines() if line.startswith("| ")]
    col = table[0].index("rows vs merge")
    assert next(r for r in table if r[0] == "| merge")[col] == "1.00"
    concept_header = [r for r in table if r[0] == "| strategy"][1]  # the per-concept table follows
    assert set(result["strategies"]["merge"]["concepts"]) == {c.strip(" |") for c in concept_header[1:]}
    code = main(
        [
            "eval",
            "--sizes",
            "2",
            "3",
            "--combos",
            "1",
            "--seeds",
            "1",
            "--steps",
            "1",
            "--strategies",
            "merge",
            "--no-checks",
            "--no-retrieval",
            "--seed",
            "7",
            "--out",
            str(tmp_path / "drawn"),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    drawn = json.loads((tmp_path / "drawn" / "results.json").read_text())
    assert drawn["strategies"]["merge"]["images"] == 2 and drawn["protocol"]["per_size"] == 1
    assert main(["eval", "--combos", "0", "-q"]) == 2 and "--combos must be at least 1" in capsys.readouterr().err
    assert main(["eval", "--strategies", "nope", "-q"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert main(["eval", "--strategies", "marginal:scale=-1", "-q"]) != 0  # before anything renders
    assert "scale must be a number >= 0" in capsys.readouterr().err
    assert main(["eval", "--strategies", "regional", "-q"]) == 2  # one object: no regions to give it
    assert "regional needs a picture with regions: measure it with --world two-objects" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, missing",
    [
        (["base"], "vae"),
        (["base", "--resume"], "model"),
        (["loras"], "model"),
        (["previews"], "model"),
    ],
)
def test_training_a_stage_before_the_one_it_needs_is_a_usage_error(tmp_path, capsys, argv, missing):
    from bench.miniworld import train

    with pytest.raises(SystemExit) as exc:
        train.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / missing} does not exist" in err
