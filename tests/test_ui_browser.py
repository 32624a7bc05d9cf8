"""The web UI in a real browser: Debian's headless Chromium driven by Playwright (no `playwright install`).

Skipped when /usr/bin/chromium (``apt-get install chromium``) or the playwright package is missing.
``LORA_COMPOSER_SCREENSHOT=docs/ui.png`` also writes the README's screenshot there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("LORA_COMPOSER_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium): browser tests skipped", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")

from lora_composer.frontends.ui import ComposerUI, launch  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lora_composer.default_model import ensure_default_model

    model_dir, default_library = ensure_default_model()
    library = tmp_path_factory.mktemp("library")
    for f in default_library.iterdir():
        if f.is_file() and not f.name.startswith("."):  # not the retriever's catalog
            shutil.copy(f, library / f.name)
    ui = ComposerUI(model_dir, library, out_dir=tmp_path_factory.mktemp("out"))
    demo = launch(ui, host="127.0.0.1", port=None, block=False)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def pick_lora(page, slot: int, name: str) -> None:
    box = page.locator(f"#lora-{slot} input").first
    box.click()
    box.fill(name)
    page.get_by_role("option", name=name, exact=True).first.click()


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def render(page, url, prompt, loras, seed=7, steps=3):
    page.goto(url)
    page.locator("#prompt textarea").fill(prompt)
    for i, (name, unet) in enumerate(loras):
        pick_lora(page, i, name)
        set_number(page, f"unet-{i}", unet)
    set_number(page, "seed", seed)
    set_number(page, "steps", steps)
    page.locator("#generate").click()
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=90_000)
    page.locator("#heatmap img").first.wait_for(state="visible", timeout=30_000)
    page.locator("#info").get_by_text("seed").first.wait_for(timeout=30_000)
    return image


def downloaded(page) -> np.ndarray:
    """The first PNG offered for download, read back over HTTP from the page's link."""
    link = page.locator("#download a").first
    href = link.get_attribute("href")
    data = page.request.get(href).body()
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_browser_prompt_two_loras_weight_run_image_and_heatmap(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    render(page, server, "a red star in pixel style", [("star-shape.safetensors", 1.2), ("pixel-style.safetensors", 0.6)])
    info = page.locator("#info").inner_text()
    assert "star-shape (te 0.8, unet 1.2)" in info and "pixel-style (te 0.8, unet 0.6)" in info
    assert float(page.locator("#guidance input[type=number]").first.input_value()) == 5.0  # the mini world's
    assert downloaded(page).shape == (64, 64, 3)
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("LORA_COMPOSER_SCREENSHOT")
    if target:
        shutil.copy(shot, target)
    page.close()


def test_two_browser_sessions_with_different_adapters(server, browser):
    jobs = {"a": [("star-shape.safetensors", 1.0)], "b": [("pixel-style.safetensors", 1.5)]}
    alone = {}
    for key, loras in jobs.items():
        page = browser.new_page()
        render(page, server, "a red circle", loras, seed=3)
        alone[key] = downloaded(page)
        page.close()
    assert not np.array_equal(alone["a"], alone["b"])

    # Two pages (two Gradio sessions) clicking Generate together; Playwright's sync API is single-threaded,
    # so both are filled first, then both buttons are clicked before either result is awaited.
    pages = {}
    for key, loras in jobs.items():
        page = browser.new_context().new_page()
        page.goto(server)
        page.locator("#prompt textarea").fill("a red circle")
        for i, (name, unet) in enumerate(loras):
            pick_lora(page, i, name)
            set_number(page, f"unet-{i}", unet)
        set_number(page, "seed", 3)
        set_number(page, "steps", 3)
        pages[key] = page
    for page in pages.values():
        page.locator("#generate").click()
    for key, page in pages.items():
        page.locator("#gallery img").first.wait_for(state="visible", timeout=90_000)
        page.locator("#download a").first.wait_for(timeout=30_000)
        np.testing.assert_array_equal(downloaded(page), alone[key])
        page.context.close()


def test_strategy_parameters_are_widgets(server, browser):
    page = browser.new_page()
    try:
        page.goto(server)
        assert not page.locator("#param-switch-every").is_visible()
        box = page.locator("#strategy input").first
        box.click()
        box.fill("switch")
        page.get_by_role("option", name="switch", exact=True).first.click()
        page.locator("#param-switch-every").wait_for(state="visible", timeout=10_000)
        set_number(page, "param-switch-every", 2)
        args = page.locator("#strategy-args textarea").first
        page.wait_for_function(
            "el => el.value.includes('every=2')", arg=args.element_handle(), timeout=10_000
        )
        assert args.input_value().strip() == "every=2"
    finally:
        page.close()
