"""Nothing is written inside the installed package: the default library's catalog and the web UI's uploads go
to the user's cache and data folders, so a read-only site-packages works."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _set_writable(root: Path, writable: bool) -> None:
    bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        os.chmod(p, (mode | stat.S_IWUSR) if writable else (mode & ~bits))


@pytest.fixture
def read_only_package(tmp_path, monkeypatch, home):
    """A copy of the shipped weights in a read-only folder that stands in for the installed package."""
    from lora_composer import cache
    from lora_composer.miniworld import assets

    package = tmp_path / "site-packages" / "lora_composer"
    weights = package / "miniworld" / "weights"
    shutil.copytree(assets.WEIGHTS, weights, ignore=shutil.ignore_patterns(".*", "uploads"))
    monkeypatch.setattr(assets, "WEIGHTS", weights)
    monkeypatch.setattr(cache, "package_dir", lambda: package.resolve())
    _set_writable(package, False)
    try:
        yield package
    finally:
        _set_writable(package, True)


def test_the_shipped_librarys_catalog_lives_in_the_user_cache(home):
    from lora_composer.cache import cache_dir, inside_package
    from lora_composer.miniworld import assets
    from lora_composer.retriever.catalog import default_catalog_path

    assert inside_package(assets.library_dir())
    path = default_catalog_path(assets.library_dir())
    assert path.is_relative_to(cache_dir()) and not inside_package(path)


def test_generation_catalog_and_uploads_with_a_read_only_package(read_only_package, home, tmp_path):
    from lora_composer.frontends.cli import main
    from lora_composer.frontends.ui import ComposerUI
    from lora_composer.miniworld import assets
    from lora_composer.retriever.catalog import default_catalog_path

    before = _snapshot(read_only_package)
    # compose with the default model and --loras auto: the catalog is built on first use
    assert (
        main(
            [
                "--prompt",
                "a red star in pixel style",
                "--loras",
                "auto",
                "--steps",
                "2",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "auto.png"),
            ]
        )
        == 0
    )
    catalog = default_catalog_path(assets.library_dir())
    assert catalog.is_file() and catalog.resolve().is_relative_to(home.resolve())
    assert main(["index", str(assets.library_dir())]) == 0  # compose index on the shipped library

    ui = ComposerUI(None, None, out_dir=tmp_path / "out")
    assert ui.auto("a red star in pixel style")["picks"]
    lora = tmp_path / "mine.safetensors"
    shutil.copy(assets.library_dir() / "star-shape.safetensors", lora)
    name = ui.add_upload(str(lora))
    assert ui.lora_path(name).is_relative_to(home.resolve())
    res = ui.render("a red circle <lora:mine:1>", steps=2, seed=1)
    assert Path(res["pngs"][0]).is_file() and not Path(res["pngs"][0]).is_relative_to(read_only_package)
    assert _snapshot(read_only_package) == before  # not one file added or changed
