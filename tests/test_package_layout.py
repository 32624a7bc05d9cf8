"""Dependencies point one way: ``bench/`` (development and research code) imports the package, never the
reverse. An installed ``lora_composer`` has no ``bench``: a package module importing it fails there only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {  # source folder -> its import name (pyproject's package-dir)
    "composer": "lora_composer",
    "fusion": "lora_composer.fusion",
    "retriever": "lora_composer.retriever",
    "kernels": "lora_composer.kernels",
}
# the mini world's training and research modules: bench/miniworld/*.py
MOVED = sorted(p.stem for p in (REPO / "bench" / "miniworld").glob("*.py") if p.stem != "__init__")


def _module_name(path: Path) -> str:
    """``composer/miniworld/world.py`` -> ``lora_composer.miniworld.world`` (a package's ``__init__``: itself)."""
    folder = path.relative_to(REPO).parts[0]
    parts = [PACKAGE_DIRS[folder], *path.relative_to(REPO / folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module a source imports, relative imports resolved, ``from M import n`` giving ``M`` and ``M.n``
    (``n`` may be a submodule); ``importlib.import_module("...")`` with a literal name counts too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(node.args[0].value)
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``source`` (the text of ``module``) that reach ``bench`` or a moved training module."""
    moved = {f"lora_composer.miniworld.{name}" for name in MOVED}
    bad = []
    for name in _imported(ast.parse(source), module, is_package):
        if name == "bench" or name.startswith("bench.") or any(name == m or name.startswith(m + ".") for m in moved):
            bad.append(name)
    return bad


def _package_sources() -> list[Path]:
    return sorted(py for folder in PACKAGE_DIRS for py in (REPO / folder).rglob("*.py") if "weights" not in py.parts)


def test_the_moved_modules_are_found():
    assert {"train", "community_train", "probes", "train_detectors", "eval_doc"} <= set(MOVED)


@pytest.mark.parametrize(
    "source, module, is_package",
    [
        ("import bench.miniworld.train", "lora_composer.miniworld.detectors", False),
        ("from bench.miniworld.train import encode", "lora_composer.miniworld.detectors", False),
        ("from bench import miniworld", "lora_composer.fusion.base", False),
        ("from lora_composer.miniworld import train", "lora_composer.frontends.evaluate", False),
        ("from lora_composer.miniworld.community_train import TEXT_LAYERS", "lora_composer.miniworld.x", False),
        ("from . import probes", "lora_composer.miniworld.evaluate", False),
        ("from .train import to_tensor", "lora_composer.miniworld", True),
        ("from ..miniworld.eval_doc import write_doc", "lora_composer.frontends.evaluate", False),
        (
            "def f():\n    import importlib\n    importlib.import_module('bench.miniworld.probes')",
            "lora_composer.x",
            False,
        ),
    ],
)
def test_the_check_catches_an_import_of_the_development_side(source, module, is_package):
    assert violations(source, module, is_package), source


def test_the_check_lets_package_imports_through():
    ok = "from lora_composer.miniworld import assets, world\nfrom .detectors import load_detector\nimport torch"
    assert violations(ok, "lora_composer.miniworld.evaluate") == []


def test_no_package_module_imports_bench_or_the_training_code():
    sources = _package_sources()
    assert len(sources) > 50, "the package's source was not found"
    found = {}
    for py in sources:
        bad = violations(py.read_text(), _module_name(py), py.name == "__init__.py")
        if bad:
            found[py.relative_to(REPO).as_posix()] = bad
    assert not found, f"package modules importing development code (bench/): {found}"


def test_the_training_modules_live_only_under_bench():
    shadowed = sorted(name for name in MOVED if (REPO / "composer" / "miniworld" / f"{name}.py").exists())
    assert not shadowed, f"composer/miniworld/ holds modules of bench/miniworld/ too: {shadowed}"
