"""The web UI in a real browser: Debian's headless Chromium driven by Playwright (no `playwright install`).

Skipped when /usr/bin/chromium (``apt-get install chromium``) or the playwright package is missing.
Screenshots are kept in ``$LORA_COMPOSER_ARTIFACTS`` (default: the test's tmp folder);
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

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def app(tmp_path_factory, home):
    """``(url, ComposerUI)`` of a server on the mini world and a copy of its library."""
    from lora_composer.default_model import ensure_default_model

    model_dir, default_library = ensure_default_model()
    library = tmp_path_factory.mktemp("library")
    for f in default_library.iterdir():
        if f.is_file() and not f.name.startswith("."):  # not the retriever's catalog
            shutil.copy(f, library / f.name)
    ui = ComposerUI(model_dir, library, out_dir=tmp_path_factory.mktemp("out"))
    demo = launch(ui, host="127.0.0.1", port=None, block=False)
    try:
        yield demo.local_url, ui
    finally:
        demo.close()


@pytest.fixture(scope="module")
def server(app):
    return app[0]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def artifacts(tmp_path) -> Path:
    """Where screenshots are kept: ``$LORA_COMPOSER_ARTIFACTS`` when set, else the test's tmp folder."""
    folder = Path(os.environ.get("LORA_COMPOSER_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pick_lora(page, slot: int, name: str) -> None:
    box = page.locator(f"#lora-{slot} input").first
    box.click()
    box.fill(name)
    page.get_by_role("option", name=name, exact=True).first.click()


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]").first
    field.fill(str(value))
    field.press("Enter")


def prompt_value(page) -> str:
    return page.locator("#prompt textarea").input_value()


def wait_for_result(page):
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=90_000)
    page.locator("#heatmap .heat-grid").first.wait_for(state="visible", timeout=30_000)
    page.locator("#info").get_by_text("seed").first.wait_for(timeout=30_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('#gallery img'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    return image


def render(page, url, prompt, seed=7, steps=3):
    """Generate ``prompt`` (its ``<lora:...>`` tags fill the LoRA rows) and wait for the image and heatmap."""
    page.goto(url)
    page.locator("#prompt textarea").fill(prompt)
    set_number(page, "seed", seed)
    set_number(page, "steps", steps)
    page.locator("#generate").click()
    return wait_for_result(page)


# The generated image: inside the viewport (no scrolling needed), not cropped by any ancestor, drawn whole
# (object-fit contain) and upscaled without smoothing.
IMAGE_VIEW = """img => {
  const r = img.getBoundingClientRect(); const cs = getComputedStyle(img);
  let clipped = false;
  for (let e = img.parentElement; e && e !== document.body; e = e.parentElement) {
    const s = getComputedStyle(e);
    if (s.overflow !== 'visible' || s.overflowX !== 'visible' || s.overflowY !== 'visible') {
      const p = e.getBoundingClientRect();
      if (r.top < p.top - 1 || r.bottom > p.bottom + 1 || r.left < p.left - 1 || r.right > p.right + 1) clipped = true;
    }
  }
  return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, width: r.width, height: r.height,
          vw: window.innerWidth, vh: window.innerHeight, fit: cs.objectFit, rendering: cs.imageRendering,
          natural: [img.naturalWidth, img.naturalHeight], clipped: clipped};
}"""


def assert_fully_visible(page, image) -> dict:
    v = image.evaluate(IMAGE_VIEW)
    assert v["top"] >= 0 and v["left"] >= 0 and v["bottom"] <= v["vh"] and v["right"] <= v["vw"], v
    assert not v["clipped"] and v["fit"] == "contain", v
    assert v["natural"] == [64, 64] and v["width"] >= 128, v  # the 64x64 image, shown upscaled
    assert v["rendering"] == "pixelated", v  # nearest neighbour
    return v


def assert_whole(page, selector: str) -> None:
    """Every image under ``selector`` is drawn whole: not cut by any ancestor (the history once showed a strip
    of each image), object-fit contain, at least its own size, and its caption (if any) below it, not over
    its corner."""
    images = page.locator(f"{selector} img")
    assert images.count() > 0
    for i in range(images.count()):
        v = images.nth(i).evaluate(IMAGE_VIEW)
        assert not v["clipped"] and v["fit"] == "contain", (selector, v)
        assert min(v["width"], v["height"]) >= 64, (selector, v)  # drawn whole (contain), at least its own size
        caption = images.nth(i).evaluate(
            "img => { const c = img.parentElement.querySelector('.caption-label');"
            " return c ? c.getBoundingClientRect().top : null; }"
        )
        assert caption is None or caption >= v["bottom"] - 1, (selector, caption, v)


def assert_layout(page) -> None:
    """The history shows whole images; the sizes follow the model (the mini world: multiples of 8 up to 4x its
    native 64, not 1536), each size box beside its label; the sampler's name is not cut."""
    assert_whole(page, "#gallery")
    assert_whole(page, "#history")
    for key in ("width", "height"):
        slider = page.locator(f"#{key} input[type=range]").first
        assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("step")) == (
            "8",
            "256",
            "8",
        )
        label = page.locator(f"#{key}").get_by_text(key.capitalize(), exact=True).first.bounding_box()
        box = page.locator(f"#{key} input[type=number]").first.bounding_box()
        assert abs((label["y"] + label["height"] / 2) - (box["y"] + box["height"] / 2)) < 12, (key, label, box)
        ends = page.locator(f"#{key}").get_by_text("256", exact=True).first
        assert ends.evaluate("e => e.scrollWidth <= e.clientWidth + 1")  # the maximum's label is whole
    sampler = page.locator("#sampler input").first
    assert sampler.input_value() == "DPM++ 2M"
    assert sampler.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), "the sampler's name is cut"


def assert_heatmap_labelled(page, steps: int, adapters: list[str]) -> None:
    heat = page.locator("#heatmap .heat").first
    box = heat.bounding_box()
    last = page.locator("#heatmap .heat-step").last
    assert last.inner_text().strip() == str(steps) and last.is_visible()
    names = page.locator("#heatmap .heat-name")
    assert names.all_inner_texts() == adapters
    for i in range(names.count()):
        b = names.nth(i).bounding_box()
        assert b["x"] >= box["x"] and b["x"] + b["width"] <= box["x"] + box["width"] + 1, (adapters[i], b, box)
        assert names.nth(i).evaluate("e => e.scrollWidth <= e.clientWidth + 1")  # not truncated
    lb = last.bounding_box()
    assert lb["x"] + lb["width"] <= box["x"] + box["width"] + 1  # the last step's column is on the page


def downloaded(page) -> np.ndarray:
    """The first PNG offered for download, read back over HTTP from the page's link."""
    link = page.locator("#download a").first
    href = link.get_attribute("href")
    data = page.request.get(href).body()
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_results_in_view_at_1280x800(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(server)
        # tags typed in the prompt fill the LoRA rows; a row added by hand writes its tag into the prompt
        page.locator("#prompt textarea").fill("a red star in pixel style <lora:star-shape:1.2>")
        page.locator("#lora-0 input").first.wait_for(timeout=15_000)
        page.wait_for_function(
            "() => document.querySelector('#lora-0 input').value === 'star-shape.safetensors'", timeout=15_000
        )
        assert page.locator("#unet-0 input").first.input_value() == "1.2"
        page.locator("#add-lora").click()
        page.locator("#lora-1 input").first.wait_for(timeout=15_000)
        pick_lora(page, 1, "pixel-style.safetensors")
        page.wait_for_function(
            "() => document.querySelector('#prompt textarea').value.includes('<lora:pixel-style:0.8>')", timeout=15_000
        )
        set_number(page, "unet-1", 0.6)
        page.wait_for_function(
            "() => document.querySelector('#prompt textarea').value.includes('<lora:pixel-style:0.8:0.6>')",
            timeout=15_000,
        )
        assert prompt_value(page) == "a red star in pixel style <lora:star-shape:1.2> <lora:pixel-style:0.8:0.6>"
        set_number(page, "seed", 7)
        set_number(page, "steps", 4)
        page.evaluate("window.scrollTo(0, 0)")
        page.locator("#generate").click()
        image = wait_for_result(page)
        assert page.evaluate("window.scrollY") == 0  # nothing scrolled: the result is beside the controls
        assert_fully_visible(page, image)
        assert_heatmap_labelled(page, 4, ["star-shape", "pixel-style"])
        shot = artifacts(tmp_path) / "ui-1280x800.png"
        page.screenshot(path=str(shot))  # the viewport: what a user sees after Generate
        assert shot.stat().st_size > 10_000
        target = os.environ.get("LORA_COMPOSER_SCREENSHOT")
        if target:
            shutil.copy(shot, target)
        info = page.locator("#info").inner_text()
        assert "star-shape (te 1.2, unet 1.2)" in info and "pixel-style (te 0.8, unet 0.6)" in info
        assert float(page.locator("#guidance input[type=number]").first.input_value()) == 5.0  # the mini world's
        assert downloaded(page).shape == (64, 64, 3)
        assert page.locator("#history img").count() == 1  # made since the page opened
        assert_layout(page)

        seed = int(info.split("seed ")[1].split(",")[0])
        set_number(page, "seed", -1)
        page.locator("#reuse-seed").click()
        page.wait_for_function(f"() => document.querySelector('#seed input').value === '{seed}'", timeout=15_000)
        body = page.locator("body").inner_text()  # no machine paths shown
        assert str(tmp_path.parent) not in body and str(Path.home()) not in body

        # PNG info: the image's own PNG brings its settings back
        png = tmp_path / "made.png"
        png.write_bytes(page.request.get(page.locator("#download a").first.get_attribute("href")).body())
        page.locator("#prompt textarea").fill("something else")
        set_number(page, "steps", 9)
        page.get_by_text("PNG info: restore the settings of an image").click()  # open its panel
        page.locator("#png-info input[type=file]").set_input_files(str(png))
        page.wait_for_function(
            "() => document.querySelector('#prompt textarea').value.startsWith('a red star')", timeout=15_000
        )
        assert prompt_value(page) == "a red star in pixel style <lora:star-shape:1.2> <lora:pixel-style:0.8:0.6>"
        assert page.locator("#steps input[type=number]").first.input_value() == "4"
        page.wait_for_function(
            "() => document.querySelector('#lora-1 input')?.value === 'pixel-style.safetensors'", timeout=15_000
        )
        # removing a row removes its tag
        page.locator("#lora-remove-0").click()
        page.wait_for_function(
            "() => !document.querySelector('#prompt textarea').value.includes('star-shape')", timeout=15_000
        )
        assert prompt_value(page) == "a red star in pixel style <lora:pixel-style:0.8:0.6>"
    finally:
        page.close()


def test_stop_button_interrupts_at_the_next_step(app, browser):
    import time

    url, ui = app
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(url)
        page.locator("#prompt textarea").fill("a red circle")
        set_number(page, "steps", 100)
        deadline = time.monotonic() + 60  # a render an earlier test started (its page closed) ends first
        while ui._stops and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not ui._stops, "an earlier render is still running"
        ui.step, ui.last_stop = 0, None
        page.locator("#generate").click()
        deadline = time.monotonic() + 60
        while (ui.step < 3 or not ui._stops) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ui._stops and ui.step >= 3, "the render did not reach its third step"
        page.locator("#stop").click()
        page.locator("#info").get_by_text("Stopped").first.wait_for(timeout=30_000)
        deadline = time.monotonic() + 30
        while (ui.last_stop or {}).get("stopped_at") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        stop = ui.last_stop
        assert stop["stopped_at"] - stop["requested_at"] <= 2 and stop["stopped_at"] < 100, stop
        print(f"stop button: asked at step {stop['requested_at']}, stopped after step {stop['stopped_at']} of 100")

    finally:
        page.close()


def test_results_in_view_on_a_phone(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        image = render(page, server, "a red star <lora:star-shape:1>", steps=2)
        assert_fully_visible(page, image)  # scrolled into view for the user
        assert_heatmap_labelled(page, 2, ["star-shape"])
        page.screenshot(path=str(artifacts(tmp_path) / "ui-390x844.png"))
        # a mistake is shown in the page, whole (the tag it quotes is text, not markup)
        page.locator("#prompt textarea").fill("a red star <lora:star-shape:1")
        page.locator("#generate").click()
        toast = page.get_by_text("unclosed tag").first
        toast.wait_for(timeout=30_000)
        assert "'<lora:star-shape:1'" in toast.inner_text()
    finally:
        page.close()


def test_two_browser_sessions_with_different_adapters(server, browser):
    jobs = {"a": "a red circle <lora:star-shape:1>", "b": "a red circle <lora:pixel-style:1.5>"}
    alone = {}
    for key, prompt in jobs.items():
        page = browser.new_page()
        render(page, server, prompt, seed=3)
        alone[key] = downloaded(page)
        page.close()
    assert not np.array_equal(alone["a"], alone["b"])

    # Two pages (two Gradio sessions) clicking Generate together; Playwright's sync API is single-threaded,
    # so both are filled first, then both buttons are clicked before either result is awaited.
    pages = {}
    for key, prompt in jobs.items():
        page = browser.new_context().new_page()
        page.goto(server)
        page.locator("#prompt textarea").fill(prompt)
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
        page.wait_for_function("el => el.value.includes('every=2')", arg=args.element_handle(), timeout=10_000)
        assert args.input_value().strip() == "every=2"
    finally:
        page.close()


def test_no_stale_output_after_an_error_and_unknown_tags_marked_at_once(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        render(page, server, "a purple star <lora:star-shape:1>", steps=2)
        # Auto: its picks table is on the screen, not below the fold
        page.locator("#auto").click()
        table = page.locator("#auto-result table").first
        table.wait_for(state="visible", timeout=60_000)
        page.wait_for_timeout(800)  # the page scrolls it into view once the rows are drawn
        box = table.bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 800, box

        # a tag naming no library file: its row is marked as soon as it is typed, before any Generate
        page.locator("#prompt textarea").fill("a purple star <lora:no-such-lora:0.7>")
        page.locator(".lora-unknown").first.wait_for(timeout=15_000)
        assert page.get_by_text("LoRA 1: not in the library").first.is_visible()

        # a request that fails: the last render's image, caption, heatmap and Auto table are not left on screen
        page.locator("#prompt textarea").fill("a purple star <lora:star-shape:1")
        page.locator("#generate").click()
        page.get_by_text("unclosed tag").first.wait_for(timeout=30_000)
        page.locator("#info").get_by_text("Nothing rendered").first.wait_for(timeout=15_000)
        info = page.locator("#info").inner_text()
        assert "unclosed tag" in info and "seed" not in info, info
        assert page.locator("#gallery img").count() == 0
        assert page.locator("#heatmap .heat-grid").count() == 0
        assert page.locator("#auto-result table").count() == 0
        assert page.locator("#download a").count() == 0
    finally:
        page.close()


def test_grid_tab_makes_a_labelled_grid(app, browser, tmp_path):
    import json

    from lora_composer.frontends.grid import GRID_KEY

    url, ui = app
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(url)
        page.locator("#prompt textarea").fill("a purple star <lora:purple-colour:1>")
        set_number(page, "seed", 4)
        set_number(page, "steps", 2)
        page.get_by_role("tab", name="Grid").click()
        page.locator("#grid-x textarea").fill("weight:star-shape=0,0.6,1")
        page.locator("#grid-y textarea").fill("guidance=3,5")
        page.locator("#grid-run").click()
        image = page.locator("#grid-gallery img").first
        image.wait_for(state="visible", timeout=120_000)
        page.locator("#grid-info").get_by_text("6 cells").first.wait_for(timeout=30_000)
        assert "6 of them shared denoiser passes" in page.locator("#grid-info").inner_text()
        assert_whole(page, "#grid-gallery")
        shot = artifacts(tmp_path) / "ui-grid-1280x800.png"
        page.screenshot(path=str(shot))
        href = page.locator("#grid-download a").first.get_attribute("href")
        import io

        png = Image.open(io.BytesIO(page.request.get(href).body()))
        data = json.loads(png.text[GRID_KEY])
        records = [c["record"] for row in data["cells"] for c in row]
        assert len(records) == 6 and {r["seed"] for r in records} == {4} and {r["steps"] for r in records} == {2}
        assert sorted({lo["unet_weight"] for r in records for lo in r["loras"] if lo["name"] == "star-shape"}) == [
            0,
            0.6,
            1,
        ]
    finally:
        page.close()
