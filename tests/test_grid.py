"""``compose grid`` on the mini world: each cell equals its solo render (ComposerPipeline, an independent
pipeline) within one 8-bit level, a weight axis runs as rows of one denoiser batch per step (counted by a
hook on the denoiser), the PNG is labelled and holds every cell's record, and bad axes are one line, exit 2,
nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lora_composer.frontends import grid as gridmod
from lora_composer.frontends.args import UsageError
from lora_composer.frontends.cli import main
from lora_composer.pnginfo import PARAMETERS_KEY

PROMPT = "a star <lora:purple-colour> BREAK a red circle"  # regions: regional has two, merge reads one prompt
STEPS = 3


@pytest.fixture(scope="module")
def world(home):
    from tests.serve_world import pipelines

    return pipelines()


class PassCounter:
    """A forward pre-hook on the denoiser: the batch size of every pass."""

    def __init__(self, module):
        self.rows: list[int] = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self.rows.append(int(sample.shape[0]))

    def close(self):
        self.handle.remove()


def _base(library, **kw):
    return {
        "prompt": PROMPT,
        "negative_prompt": "",
        "loras": [],
        "strategy": "merge",
        "strategy_args": {},
        "seed": 5,
        "steps": STEPS,
        "guidance": 5.0,
        "sampler": None,
        "width": 64,
        "height": 64,
        **kw,
    }


def test_cells_equal_their_solo_renders_and_weights_share_one_pass_per_step(world):
    composer, solo, library = world

    def resolve(name):
        return (library / f"{name}.safetensors").resolve()

    x = gridmod.parse_axis("weight:star-shape=0.4,0.7,1.0", "--x")
    y = gridmod.parse_axis("strategy=merge,regional", "--y")
    grid = gridmod.plan(_base(library), x, y, None, resolve)
    counter = PassCounter(composer.pipe.unet)
    try:
        gridmod.run(composer, grid)
    finally:
        counter.close()
    grid_rows = list(counter.rows)

    solo_passes = {}
    for cell in grid.flat():
        s = cell.settings
        counter = PassCounter(solo.pipe.unet)
        try:
            want = solo(
                s["prompt"],
                loras=[(str(p), te, unet) for p, te, unet in s["loras"]],
                strategy=s["strategy"],
                num_inference_steps=STEPS,
                guidance_scale=5.0,
                seed=5,
                height=64,
                width=64,
                output_type="np",
                progress=False,
            )[0]
        finally:
            counter.close()
        solo_passes[(cell.y, cell.x)] = counter.rows
        got = np.asarray(cell.image.convert("RGB"), dtype=np.float32) / 255
        # the cell holds the solo render's 8-bit image (one level of rounding at most)
        assert np.abs(got - np.round(want * 255) / 255).max() <= 1 / 255 + 1e-6, (cell.y, cell.x)
        rec = cell.record
        assert rec.strategy == s["strategy"] and rec.seed == 5 and rec.steps == STEPS
        weights = {lo["name"]: lo["unet_weight"] for lo in rec.loras}
        assert weights["star-shape"] == x.values[cell.x]
    # the weight axis acts: the three merge cells differ
    merge = [c for c in grid.flat() if c.settings["strategy"] == "merge"]
    assert np.abs(np.asarray(merge[0].image, dtype=float) - np.asarray(merge[2].image, dtype=float)).max() > 20

    # merge's three weights: one pass per step, three cells x (uncond, cond) rows in it; alone they take 3 x STEPS
    assert all(len(solo_passes[(0, i)]) == STEPS for i in range(3))
    regional = sum(len(solo_passes[(1, i)]) for i in range(3))  # regional cannot share a batch: cell by cell
    assert len(grid_rows) == STEPS + regional, grid_rows
    assert grid_rows.count(3 * 2) == STEPS, grid_rows
    assert all(c.batched_with == 2 for c in merge)


def test_grid_png_is_labelled_and_holds_every_cell(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "grid",
            "-p",
            "a purple star",
            "--lora",
            "purple-colour:0.8",
            "--x",
            "weight:star-shape=0,1",
            "--y",
            "guidance=3,5",
            "--z",
            "seed=1,2",
            "--steps",
            "2",
            "--out",
            "plot.png",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "grid of 8" in err and "16/16" in err  # the progress bar counts every cell's steps
    paths = [tmp_path / "plot-seed-1.png", tmp_path / "plot-seed-2.png"]
    assert sorted(tmp_path.iterdir()) == paths
    for seed, path in zip((1, 2), paths):
        image = Image.open(path)
        data = json.loads(image.text[gridmod.GRID_KEY])
        assert data["x"] == {"axis": "weight:star-shape", "values": [0.0, 1.0]}
        assert data["z"]["value"] == seed
        cells = [c for row in data["cells"] for c in row]
        assert len(cells) == 4
        for c in cells:
            rec = c["record"]
            assert rec["seed"] == seed and rec["guidance_scale"] == (3.0, 5.0)[c["y"]]
            w = {lo["name"]: lo["unet_weight"] for lo in rec["loras"]}
            assert w == {"purple-colour": 0.8, "star-shape": (0.0, 1.0)[c["x"]]}
        assert f"Seed: {seed}" in image.text[PARAMETERS_KEY]
        # labels drawn: the band above the cells and the column left of them are not blank
        a = np.asarray(image.convert("L"))
        assert a.shape[0] > 2 * 192 and a.shape[1] > 2 * 192
        assert (a[:20] < 128).any() and (a[:, :40] < 128).any()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--x", "colour=1,2"], "--x 'colour=1,2': expected KIND=V1,V2,... with KIND one of"),
        (["--x", "weight=0.4,1"], "a weight axis names its LoRA"),
        (["--x", "weight:star-shape=0.4,,1"], "an empty value"),
        (["--x", "weight:star-shape=0.4,heavy"], "--x: weight value 'heavy' is not a number"),
        (["--x", "steps=0,4"], "--x: steps 0 must be between 1 and 1000"),
        (["--x", "guidance=nan"], "--x: guidance value 'nan' must be a finite number"),
        (["--x", "seed=1,99999999999999999999999"], "must be between 0 and"),
        (["--x", "strategy=merge,blend"], "--x: unknown strategy 'blend'"),
        (["--x", "seed=1,2", "--y", "seed=3"], "--y sweeps seed as --x does"),
        (["--x", "weight:no-such-lora=1"], "no-such-lora"),
        (["--x", "strategy=merge,regional"], "needs a prompt split into regions with BREAK"),
        (["--x", "sampler=Euler a,Warp drive"], "sampler 'Warp drive' is not available for this model"),
        (["--x", "steps=1", "--out", "plot.jpg"], "the output is a PNG"),
        (["--x", "loras=star-shape+,none"], "--x: an empty LoRA name in 'star-shape+'"),
        (["--x", "loras=star-shape:heavy"], "--x: weight 'heavy' of star-shape is not a number"),
    ],
)
def test_bad_axes_are_one_line_exit_2_nothing_written(world, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code = main(["grid", "-p", "a purple star", "--steps", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("compose grid: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_seed_minus_one_on_an_axis_is_random():
    seeds = gridmod.parse_axis("seed=-1,7", "--z").values
    assert seeds[1] == 7 and 0 <= seeds[0] < 2**32
    with pytest.raises(UsageError, match="seed -2 must be between 0 and"):
        gridmod.parse_axis("seed=-2", "--z")


def test_plan_puts_each_axis_value_in_its_cell(tmp_path):
    """No model: the cells' settings. Tags join the LoRAs (last one per file wins), a weight axis overrides a
    tag's weight or adds its LoRA; a regional cell keeps its tags in place, the swept one at the axis's value."""

    def resolve(name):
        return tmp_path / f"{name}.safetensors"

    base = {
        "prompt": "a star <lora:purple-colour:0.5> BREAK a circle <lora:star-shape:0.3>",
        "negative_prompt": "",
        "loras": [(resolve("pixel-style"), 0.2, 0.4)],
        "strategy": "merge",
        "strategy_args": {"x": 1},
        "seed": 1,
        "steps": 2,
        "guidance": 5.0,
        "sampler": None,
        "width": 64,
        "height": 64,
    }
    x = gridmod.parse_axis("weight:star-shape=0,1", "--x")
    y = gridmod.parse_axis("strategy=merge,regional", "--y")
    z = gridmod.parse_axis("steps=2,3", "--z")
    grid = gridmod.plan(base, x, y, z, resolve)
    assert [len(grid.cells), len(grid.cells[0]), len(grid.cells[0][0])] == [2, 2, 2]
    merge, regional = grid.cells[1][0][1].settings, grid.cells[1][1][1].settings
    assert merge["steps"] == 3 and merge["strategy_args"] == {"x": 1}
    assert merge["prompt"] == "a star BREAK a circle"
    assert {p.stem: (te, unet) for p, te, unet in merge["loras"]} == {
        "pixel-style": (0.2, 0.4),
        "purple-colour": (0.5, 0.5),
        "star-shape": (1.0, 1.0),
    }
    assert regional["strategy"] == "regional" and regional["strategy_args"] == {}
    assert f"<lora:{resolve('star-shape')}:1>" in regional["prompt"]
    assert f"<lora:{resolve('purple-colour')}:0.5>" in regional["prompt"]
    assert [p.stem for p, _, _ in regional["loras"]] == ["pixel-style"]  # the tagged ones act in their regions
    assert sorted(p.stem for p in regional["region_loras"]) == ["purple-colour", "star-shape"]
    assert f"<lora:{resolve('star-shape')}:0>" in grid.cells[0][1][0].settings["prompt"]


def test_a_lora_set_axis_replaces_the_given_loras(tmp_path):
    def resolve(name):
        return tmp_path / f"{name}.safetensors"

    x = gridmod.parse_axis("loras=star-shape+purple-colour:0.8,pixel-style,none", "--x")
    assert [x.label(v) for v in x.values] == ["star-shape + purple-colour 0.8", "pixel-style", "no LoRA"]
    base = {
        "prompt": "a star <lora:wavy-bg:0.5>",
        "negative_prompt": "",
        "loras": [(resolve("orange-colour"), 1, 1)],
        "strategy": "merge",
        "strategy_args": {},
        "seed": 1,
        "steps": 2,
        "guidance": 5.0,
        "sampler": None,
        "width": 64,
        "height": 64,
    }
    cells = gridmod.plan(base, x, None, None, resolve).flat()
    assert [{p.stem: unet for p, _, unet in c.settings["loras"]} for c in cells] == [
        {"star-shape": 1.0, "purple-colour": 0.8, "wavy-bg": 0.5},
        {"pixel-style": 1.0, "wavy-bg": 0.5},
        {"wavy-bg": 0.5},
    ]  # the prompt's tags stay in every cell
