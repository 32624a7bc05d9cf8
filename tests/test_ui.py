"""The web UI (lora_composer.frontends.ui) driven in-process through gradio_client: renders, concurrency,
confinement, samplers, PNG info, Stop, and errors logged as one line."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

from lora_composer import tiny  # noqa: E402
from lora_composer.errors import ComposerError  # noqa: E402
from lora_composer.miniworld.library import LORAS  # noqa: E402
from lora_composer.frontends import ui_view  # noqa: E402
from lora_composer.frontends.ui import ComposerUI, launch, parse_strategy_args  # noqa: E402


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A valid LoRA file outside the library."""
    folder = tmp_path_factory.mktemp("outside")
    pipe = tiny.build_tiny_sd15_pipeline(seed=0)
    return tiny.save_diffusers_lora(
        pipe, tiny.random_lora_layers(pipe, rank=4, seed=9), folder / "evil.safetensors", rank=4
    )


@pytest.fixture(scope="module")
def ui(tmp_path_factory, outside, home):
    from lora_composer.default_model import ensure_default_model

    model_dir, default_library = ensure_default_model()
    library = tmp_path_factory.mktemp("library")
    for f in default_library.iterdir():
        if f.is_file() and not f.name.startswith("."):  # not the retriever's catalog
            shutil.copy(f, library / f.name)
    os.symlink(outside, library / "linked.safetensors")  # points outside: must not be listed nor read
    return ComposerUI(model_dir, library, out_dir=tmp_path_factory.mktemp("out"), max_upload_mb=1)


@pytest.fixture(scope="module")
def client(ui):
    demo = launch(ui, host="127.0.0.1", port=None, block=False)
    try:
        yield gradio_client.Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def generate(
    client,
    prompt="a red circle",
    loras=(),
    strategy="merge",
    args="",
    compare="",
    seed=5,
    steps=2,
    guidance=5.0,
    sampler="DPMSolverMultistepScheduler",
    negative="",
    width=64,
    height=64,
):
    """``/generate``; ``loras`` ``[(name, te, unet)]`` go into the prompt as tags, as the LoRA rows write them.
    Returns ``(images, pngs, info, heatmap html)``."""
    prompt = (
        ui_view.prompt_with_slots(prompt, [ui_view.new_slot(n, te, unet) for n, te, unet in loras]) if loras else prompt
    )
    images, info, heat, files, _history = client.predict(
        prompt,
        negative,
        strategy,
        args,
        compare,
        sampler,
        seed,
        steps,
        guidance,
        width,
        height,
        1,
        api_name="/generate",
    )
    return images, [f for f in files if not f.endswith(".explain.png")], info, heat


def pixels(item) -> np.ndarray:
    path = item["image"] if isinstance(item, dict) else item
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_returns_image_heatmap_and_png_with_metadata(client):
    images, pngs, info, heat = generate(
        client,
        loras=[("star-shape.safetensors", 0.8, 0.8), ("pixel-style.safetensors", 0.5, 1.0)],
        strategy="switch",
        args="every=1",
        compare="merge",
    )
    assert len(images) == 2 and len(pngs) == 2  # side by side: switch, then merge with the same seed
    assert pixels(images[0]).shape == (64, 64, 3)
    assert heat.count('class="heat-grid"') == 2 and "star-shape" in heat and "pixel-style" in heat
    assert '<div class="heat-step">2</div>' in heat  # the last step is labelled
    png = Image.open(pngs[0])
    assert "lora-composer" in png.info and "pixel-style" in png.info["parameters"]
    assert "switch" in info and "merge" in info and "star-shape" in info


def test_guidance_defaults_to_the_models(client, ui, sd15_pipe, tmp_path):
    from lora_composer.pnginfo import read_record
    from lora_composer.frontends.ui import build_app

    def slider(u):
        return next(b for b in build_app(u).blocks.values() if getattr(b, "elem_id", None) == "guidance")

    assert ui.default_guidance == 5.0 and slider(ui).value == 5.0  # the mini world's guidance
    assert ui.render("a red circle", steps=2, seed=1)["records"][0].guidance_scale == 5.0
    _, pngs, _, _ = generate(client, guidance=6.5)  # the slider's value wins
    assert read_record(pngs[0]).guidance_scale == 6.5

    model = tmp_path / "tiny"
    sd15_pipe.save_pretrained(str(model))
    other = ComposerUI(model, ui.library, out_dir=tmp_path / "out")
    assert other.default_guidance == 7.5 and slider(other).value == 7.5
    res = other.render("a red circle", steps=2, seed=1, width=64, height=64)
    assert res["records"][0].guidance_scale == 7.5


def test_two_concurrent_clients_get_their_own_adapters(client, ui):
    a = [("star-shape.safetensors", 1.0, 1.0)]
    b = [("pixel-style.safetensors", 0.3, 1.5)]
    alone_a = pixels(generate(client, loras=a, seed=11)[0][0])
    alone_b = pixels(generate(client, loras=b, seed=11)[0][0])
    assert not np.array_equal(alone_a, alone_b)

    c2 = gradio_client.Client(client.src, verbose=False)
    results = {}

    def run(key, c, loras):
        results[key] = [pixels(generate(c, loras=loras, seed=11)[0][0]) for _ in range(2)]

    threads = [threading.Thread(target=run, args=("a", client, a)), threading.Thread(target=run, args=("b", c2, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for got in results["a"]:
        np.testing.assert_array_equal(got, alone_a)
    for got in results["b"]:
        np.testing.assert_array_equal(got, alone_b)


def test_paths_outside_the_library_are_refused(client, ui, outside):
    assert sorted(ui.library_names()) == sorted(f"{s.name}.safetensors" for s in LORAS)  # not the symlink
    for bad in (str(outside), "../outside/evil.safetensors", "linked.safetensors", "linked", "/etc/passwd", "~/x"):
        with pytest.raises(ComposerError, match="not in the library"):
            ui.lora_path(bad)
    with pytest.raises(ComposerError, match="not in the library"):  # a LoRA row naming a path
        ui.render("a red circle", loras=[(str(outside), 1.0, 1.0)], steps=1)
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the library"):
        generate(client, prompt=f"a red circle <lora:{outside}:1>")
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the library"):
        generate(client, prompt="a red circle <lora:../outside/evil:1>")


def test_errors_show_in_the_page_and_are_logged_as_one_line(client, capfd):
    capfd.readouterr()
    with pytest.raises(gradio_client.exceptions.AppError, match="no argument nonsense"):
        generate(client, loras=[("pixel-style.safetensors", 1, 1)], strategy="switch", args="nonsense=3")
    with pytest.raises(gradio_client.exceptions.AppError, match="KEY=VALUE"):
        generate(client, args="every")
    with pytest.raises(gradio_client.exceptions.AppError, match="unclosed"):
        generate(client, prompt="a red circle <lora:star-shape")
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    logged = [line for line in err.splitlines() if line.startswith("compose ui: ")]
    assert len(logged) == 3, err  # one line per mistake
    assert "nonsense" in logged[0] and "KEY=VALUE" in logged[1] and "unclosed tag '<lora:star-shape'" in logged[2]
    images, *_ = generate(client, loras=[("pixel-style.safetensors", 1, 1)])  # the server keeps serving
    assert pixels(images[0]).shape == (64, 64, 3)


def test_auto_shows_each_pick_its_span_and_what_was_left_out(client):
    table, _previews, prompt = client.predict("a red circle in pixel style", 2, api_name="/auto")
    assert "<table" in table and "covers" in table and "&ldquo;pixel style&rdquo;" in table
    assert "left out" in table and "below threshold" in table  # why the others were not picked
    assert prompt == "a red circle in pixel style <lora:pixel-style:1>"  # the rows, written as tags


def test_prompt_tags_and_rows_stay_in_step():
    names = {"star-shape": "star-shape.safetensors", "pixel-style": "pixel-style.safetensors"}
    rows = ui_view.slots_from_prompt("a star <lora:star-shape:0.5:1.2>, <lora:pixel-style>", lambda n: names.get(n, n))
    assert rows == [
        ui_view.new_slot("star-shape.safetensors", 0.5, 1.2),
        ui_view.new_slot("pixel-style.safetensors", 1, 1),
    ]
    assert (
        ui_view.prompt_with_slots("a star <lora:old:1>, ", rows)
        == "a star <lora:star-shape:0.5:1.2> <lora:pixel-style:1>"
    )
    assert ui_view.slots_from_prompt("a star <lora:star-sha", str) is None  # a tag being typed: rows unchanged
    assert ui_view.slots_from_prompt(ui_view.prompt_with_slots("x", rows), lambda n: names.get(n, n)) == rows
    # a regional prompt keeps each tag in its region: new weights in place, a removed row's tag gone, a new row last
    regional = "a star <lora:star-shape:1>, red BREAK a square <lora:old:1>, blue"
    assert (
        ui_view.prompt_with_slots(regional, rows)
        == "a star <lora:star-shape:0.5:1.2>, red BREAK a square, blue <lora:pixel-style:1>"
    )


def test_a1111_parameters_are_parsed():
    text = (
        "a castle, <lora:ink:0.7>\nNegative prompt: blurry, low quality\nSteps: 30, Sampler: Euler a, "
        'CFG scale: 6.5, Seed: 42, Size: 512x768, Model hash: abc123, Lora hashes: "ink: 0123456789ab"'
    )
    p = ui_view.parse_a1111(text)
    assert p["prompt"] == "a castle, <lora:ink:0.7>" and p["negative_prompt"] == "blurry, low quality"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"]) == ("30", "Euler a", "6.5", "42", "512x768")
    assert p["Lora hashes"] == "ink: 0123456789ab"


def test_sampler_choice(client, ui):
    assert "EulerAncestralDiscreteScheduler" in ui.samplers and "DDIMScheduler" in ui.samplers
    base = ui.pipe.pipe.scheduler
    _, (dpm,), _, _ = generate(client, seed=2)
    _, (euler,), info, _ = generate(client, seed=2, sampler="EulerDiscreteScheduler")
    from lora_composer.pnginfo import read_record

    assert read_record(euler).scheduler == "EulerDiscreteScheduler" and "Euler" in info
    assert read_record(dpm).scheduler == "DPMSolverMultistepScheduler"
    assert not np.array_equal(pixels(dpm), pixels(euler))
    assert ui.pipe.pipe.scheduler is base  # the model's own is back for the next render
    assert ui.sampler_class("Euler a") == "EulerAncestralDiscreteScheduler"


def test_png_info_restores_a_png_written_by_the_cli_and_renders_it_again(client, ui, tmp_path):
    from lora_composer.frontends.cli import main

    out = tmp_path / "x.png"
    assert (
        main(
            [
                "--prompt",
                "a red star <lora:star-shape:0.9:1.1>",
                "--negative-prompt",
                "blurry",
                "--seed",
                "4",
                "--steps",
                "5",
                "--guidance",
                "6",
                "--strategy",
                "switch",
                "--strategy-arg",
                "every=2",
                "--library",
                str(ui.library),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (prompt, negative, strategy, args, seed, steps, guidance, width, height, sampler, note, compare) = client.predict(
        gradio_client.handle_file(str(out)), api_name="/png_info"
    )
    assert prompt == "a red star <lora:star-shape:0.9:1.1>" and negative == "blurry"
    assert (strategy, seed, steps, guidance, width, height) == ("switch", 4, 5, 6.0, 64, 64)
    assert "every=2" in args and sampler == "DPMSolverMultistepScheduler" and "Restored" in note
    again, *_ = generate(
        client,
        prompt=prompt,
        negative=negative,
        strategy=strategy,
        args=args,
        seed=seed,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        width=width,
        height=height,
    )
    np.testing.assert_array_equal(pixels(again[0]), pixels(out))


def test_png_info_reads_a1111_parameters(ui, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text(
        "parameters",
        "a blue cross <lora:cross-shape:0.7>\nNegative prompt: blurry\n"
        "Steps: 7, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 64x64, Model hash: abc",
    )
    path = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(path, pnginfo=meta)
    r = ui.restore(path)
    assert r["prompt"] == "a blue cross <lora:cross-shape:0.7>" and r["negative_prompt"] == "blurry"
    assert (r["steps"], r["guidance"], r["seed"], r["width"], r["sampler"]) == (
        7,
        6.5,
        42,
        64,
        "EulerAncestralDiscreteScheduler",
    )
    assert r["slots"] == [ui_view.new_slot("cross-shape.safetensors", 0.7, 0.7)] and not r["notes"]
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ComposerError, match="no generation settings"):
        ui.restore(tmp_path / "plain.png")


def test_stop_interrupts_a_100_step_render_at_the_next_step(client, ui):
    import time

    ui.last_stop, ui.step = None, 0
    job = client.submit(
        "a red circle", "", "merge", "", "", "DPMSolverMultistepScheduler", 1, 100, 5.0, 64, 64, 1, api_name="/generate"
    )
    deadline = time.monotonic() + 60
    while (ui.step < 3 or not ui._stops) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert 3 <= ui.step < 100
    client.predict(api_name="/stop")
    deadline = time.monotonic() + 30
    while (ui.last_stop or {}).get("stopped_at") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    stop = ui.last_stop
    assert stop["stopped_at"] is not None and stop["steps"] == 100
    assert stop["stopped_at"] - stop["requested_at"] <= 2, stop  # within two steps of the click
    print(f"stop: asked at step {stop['requested_at']}, stopped after step {stop['stopped_at']} of 100")
    try:
        job.result(timeout=30)
    except Exception:  # cancelled: no image
        pass
    images, *_ = generate(client)  # the next render runs normally
    assert pixels(images[0]).shape == (64, 64, 3)


def test_uploads_are_safetensors_only_and_capped(ui, tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(ComposerError, match="only .safetensors"):
        ui.add_upload(str(bad))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ComposerError, match="not a"):
        ui.add_upload(str(junk))
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(ComposerError, match="limit"):
        ui.add_upload(str(big))
    good = tmp_path / "my lora!.safetensors"
    shutil.copy(ui.library / "pixel-style.safetensors", good)
    name = ui.add_upload(str(good))
    assert name == "uploads/my-lora.safetensors" and name in ui.library_names()
    from lora_composer.cache import data_dir

    assert ui.lora_path(name).parent == data_dir().resolve() / "uploads"  # the user's data folder, not the library
    assert not (ui.library / "uploads").exists()
    ui.lora_path(name).unlink()


def test_parse_strategy_args():
    assert parse_strategy_args("every=2 order=none") == {"every": 2, "order": None}
    assert parse_strategy_args("cache_bounds=0.2,0.8\nschedule=late") == {
        "cache_bounds": (0.2, 0.8),
        "schedule": "late",
    }
    assert parse_strategy_args("") == {}
    with pytest.raises(ComposerError):
        parse_strategy_args("every")


def test_strategy_parameter_widgets_write_only_changed_values(ui):
    from lora_composer.frontends.ui import _args_text, build_app, parse_strategy_args
    from lora_composer.fusion.registry import available, strategy_params

    params = [("every", 5), ("order", None), ("cache", True), ("cache_intervals", (2, 3, 2)), ("temperature", 1.0)]
    untouched = [5, "", True, "2,3,2", 1.0]
    assert _args_text(params, untouched) == ""
    text = _args_text(params, [3, "b,a", False, "2,2,2", 0.5])
    assert parse_strategy_args(text) == {
        "every": 3,
        "order": ("b", "a"),
        "cache": False,
        "cache_intervals": (2, 2, 2),
        "temperature": 0.5,
    }
    demo = build_app(ui)  # one widget per parameter of every strategy that has any
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    for name in available():
        for key in strategy_params(name):
            assert f"param-{name}-{key}" in ids, (name, key)


def test_compose_ui_is_a_subcommand(capsys):
    from lora_composer.frontends.cli import main

    assert main(["ui", "--help"]) == 0
    assert "--host" in capsys.readouterr().out


# -- notebooks -------------------------------------------------------------------------------------
NOTEBOOKS = sorted((__import__("pathlib").Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # the kernel inherits this: one OpenMP thread keeps it from oversubscribing cores other processes also use
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install -e '.[test]')")

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed with their outputs cleared
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: clear the outputs before committing"
            )
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" for o in outputs)  # the plots
    text = "\n".join(str(o.get("text", "")) for o in outputs if o.get("output_type") == "stream")
    assert "IProgress not found" not in text and "TqdmWarning" not in text, text[:2000]


def test_regional_prompts_keep_their_tags_in_their_regions(ui):
    """The UI passes a regional prompt's tags where they stand (named by their library files); a LoRA row that no
    tag names acts in every region."""
    prompt = "a purple circle <lora:purple-colour:0.9> BREAK blinky, a red square <lora:blinky-character>"
    rows = [("wavy-bg.safetensors", 1.0, 1.0), ("purple-colour.safetensors", 0.9, 0.9)]
    record = ui.render(prompt, loras=rows, strategy="regional", steps=1, width=128, height=64)["records"][0]
    regions = record.strategy_args["regions"]
    assert [r["prompt"] for r in regions] == ["a purple circle", "blinky, a red square"]
    assert [r["loras"] for r in regions] == [
        {"wavy-bg": 1.0, "purple-colour": 0.9},
        {"wavy-bg": 1.0, "blinky-character": 1.0},
    ]
    with pytest.raises(ComposerError, match="not in the library"):
        ui.render("a BREAK b <lora:/etc/passwd>", strategy="regional", steps=1)


def test_size_sliders_follow_the_model(ui):
    """Width and height go from the model's multiple to its budget (4x its native side), not to 1536."""
    from lora_composer.frontends.ui import build_app

    multiple, (native_h, native_w) = ui.pipe.size_rules()
    props = {c["props"].get("elem_id"): c["props"] for c in build_app(ui).config["components"] if "props" in c}
    assert (props["width"]["minimum"], props["width"]["maximum"], props["width"]["step"]) == (
        multiple,
        4 * native_w,
        multiple,
    )
    assert (props["height"]["minimum"], props["height"]["maximum"]) == (multiple, 4 * native_h)
    assert props["width"]["value"] == native_w == 64  # the mini world's native side


def test_seed_minus_one_is_random_as_on_the_command_line(ui):
    seeds = [ui.render("a red circle", steps=1, seed=-1)["records"][0].seed for _ in range(2)]
    assert seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)  # drawn per render and recorded
    assert ui.render("a red circle", steps=1, seed=3)["records"][0].seed == 3
    with pytest.raises(ComposerError, match=r"seed -2: must be between 0 and \d+ \(or -1: random\)"):
        ui.render("a red circle", steps=1, seed=-2)


def test_grid_of_the_pages_settings(ui):
    import json

    from lora_composer.frontends.grid import GRID_KEY

    res = ui.grid("a purple star <lora:purple-colour:1>", steps=1, seed=3, x="weight:star-shape=0,1", z="seed=3,4")
    assert res["cells"] == 4 and res["batched"] == 4 and len(res["pngs"]) == 2  # one grid per Z value
    for seed, path in zip((3, 4), res["pngs"]):
        data = json.loads(Image.open(path).text[GRID_KEY])
        records = [c["record"] for row in data["cells"] for c in row]
        assert [r["seed"] for r in records] == [seed, seed]
        assert [{lo["name"]: lo["unet_weight"] for lo in r["loras"]} for r in records] == [
            {"purple-colour": 1.0, "star-shape": 0.0},
            {"purple-colour": 1.0, "star-shape": 1.0},
        ]
    with pytest.raises(ComposerError, match=r"^X axis 'colour=1': expected KIND=V1,V2,\.\.\. with KIND one of"):
        ui.grid("a star", x="colour=1")
    with pytest.raises(ComposerError, match="give an X axis"):
        ui.grid("a star", y="seed=1,2")
    with pytest.raises(ComposerError, match="is not in the library"):  # confined to the library, as the rows are
        ui.grid("a star", x="weight:../evil=0,1")


def test_grid_with_auto_runs_the_strategy_auto_picks(ui):
    """The Generate tab's ``auto`` in the Grid tab: every cell runs (and records) the strategy a render would pick
    (regional for a prompt with regions), not a failure."""
    import json

    from lora_composer.frontends.grid import GRID_KEY
    from lora_composer.fusion.registry import resolve_auto

    prompt = "a star <lora:star-shape:1> BREAK a purple thing <lora:purple-colour:1>"
    res = ui.grid(prompt, strategy="auto", steps=1, seed=3, x="seed=3,4")
    records = [c["record"] for row in json.loads(Image.open(res["pngs"][0]).text[GRID_KEY])["cells"] for c in row]
    assert {r["strategy"] for r in records} == {resolve_auto(prompt, 0, ui.pipe.world)[0]} == {"regional"}
