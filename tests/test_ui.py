"""The web UI (lora_composer.frontends.ui) driven in-process through gradio_client: renders, concurrency, confinement."""

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
from lora_composer.frontends.ui import MAX_SLOTS, ComposerUI, launch, parse_strategy_args  # noqa: E402


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A valid LoRA file outside the library."""
    folder = tmp_path_factory.mktemp("outside")
    pipe = tiny.build_tiny_sd15_pipeline(seed=0)
    return tiny.save_diffusers_lora(pipe, tiny.random_lora_layers(pipe, rank=4, seed=9), folder / "evil.safetensors", rank=4)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, outside):
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


def generate(client, prompt="a red circle", loras=(), strategy="merge", args="", compare="", seed=5, steps=2,
             guidance=5.0):
    slots = []
    for i in range(MAX_SLOTS):
        name, te, unet = loras[i] if i < len(loras) else ("", 0.8, 0.8)
        slots += [name, te, unet]
    return client.predict(prompt, "", strategy, args, compare, seed, steps, guidance, 64, 64, 1, *slots,
                          api_name="/generate")


def pixels(item) -> np.ndarray:
    path = item["image"] if isinstance(item, dict) else item
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_returns_image_heatmap_and_png_with_metadata(client):
    images, heatmaps, pngs, info = generate(
        client, loras=[("star-shape.safetensors", 0.8, 0.8), ("pixel-style.safetensors", 0.5, 1.0)],
        strategy="switch", args="every=1", compare="merge",
    )
    assert len(images) == 2 and len(heatmaps) == 2  # side by side: switch, then merge with the same seed
    assert pixels(images[0]).shape == (64, 64, 3)
    heat = Image.open(heatmaps[0]["image"])
    assert heat.width > 100 and heat.height > 100
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
    _, _, pngs, _ = generate(client, guidance=6.5)  # the slider's value wins
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
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the library"):
        generate(client, loras=[(str(outside), 1.0, 1.0)])
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the library"):
        generate(client, prompt=f"a red circle <lora:{outside}:1>")
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the library"):
        generate(client, prompt="a red circle <lora:../outside/evil:1>")


def test_errors_show_in_the_page_and_the_server_keeps_serving(client):
    with pytest.raises(gradio_client.exceptions.AppError, match="no argument nonsense"):
        generate(client, loras=[("pixel-style.safetensors", 1, 1)], strategy="switch", args="nonsense=3")
    with pytest.raises(gradio_client.exceptions.AppError, match="KEY=VALUE"):
        generate(client, args="every")
    images, *_ = generate(client, loras=[("pixel-style.safetensors", 1, 1)])
    assert pixels(images[0]).shape == (64, 64, 3)


def test_auto_fills_the_picker_with_the_retrievers_choice(client):
    out = client.predict("a red circle in pixel style", 2, api_name="/auto")
    table, first = out[0], out[2]
    assert "pixel-style" in table and "score" in table
    assert first["value"] == "pixel-style.safetensors"


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
    assert ui.lora_path(name).parent == ui.library / "uploads"
    (ui.library / name).unlink()


def test_parse_strategy_args():
    assert parse_strategy_args("every=2 order=none") == {"every": 2, "order": None}
    assert parse_strategy_args("cache_bounds=0.2,0.8\nschedule=late") == {"cache_bounds": (0.2, 0.8), "schedule": "late"}
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
        "every": 3, "order": ("b", "a"), "cache": False, "cache_intervals": (2, 2, 2), "temperature": 0.5,
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
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear the outputs before committing"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))  # the plots
