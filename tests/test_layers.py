"""The installed package's import graph: dependencies point one way, from the front ends down to the kernels.

Every module of ``lora_composer`` belongs to one unit (a subpackage or a module of the root) and every unit to
a layer; a module may import only from units of lower layers (or its own unit). That also rules out any
cycle between the four folders (``composer/``'s units, ``fusion/``, ``retriever/``, ``kernels/``). Imports
inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

# Bottom to top. Units on one line are peers: they may not import each other.
LAYERS = [
    [
        "lora_composer.vocab",
        "lora_composer.errors",
        "lora_composer.cache",
        "lora_composer.source_tree",
        "lora_composer.measured",
    ],
    ["lora_composer.kernels", "lora_composer.prompt_syntax", "lora_composer.library", "lora_composer.tiny"],
    ["lora_composer.adapters", "lora_composer.pnginfo", "lora_composer.tiny_dit"],
    ["lora_composer.runtime"],
    ["lora_composer.fusion", "lora_composer.retriever"],
    ["lora_composer.driver", "lora_composer.explain", "lora_composer.render"],
    ["lora_composer.pipeline"],
    ["lora_composer.miniworld"],
    ["lora_composer.default_model", "lora_composer.devices"],  # devices reads which pipeline class a model is
    ["lora_composer.serving"],
    ["lora_composer.frontends"],
    ["lora_composer", "lora_composer.__main__"],  # the public API's facade and `python -m lora_composer`
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}
FOLDERS = ("lora_composer.fusion", "lora_composer.retriever", "lora_composer.kernels")


def _package_modules() -> dict[str, Path]:
    """Module name -> source file, for the installed package (found the way Python finds it)."""
    modules: dict[str, Path] = {}
    for package in ("lora_composer", *FOLDERS):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            name = ".".join((package, *rel))
            if any(name.startswith(f + ".") or name == f for f in FOLDERS) and package == "lora_composer":
                continue  # the other folders are walked from their own location
            modules[name] = path
    return modules


def unit_of(module: str) -> str:
    """The longest unit that ``module`` is or lies in."""
    best = ""
    for unit in LEVEL:
        if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best):
            best = unit
    return best


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (absolute and relative, at any depth of the file)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # ``from pkg import module`` imports the module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m == "lora_composer" or m.startswith("lora_composer.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _package_modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_the_four_folders_are_found_where_the_design_card_puts_them(graph):
    repo = Path(__file__).resolve().parents[1]
    for package, folder in [("lora_composer", "composer"), *[(f, f.split(".")[1]) for f in FOLDERS]]:
        origin = Path(importlib.util.find_spec(package).origin)
        assert origin == repo / folder / "__init__.py", f"{package} is not the repository's {folder}/"
    assert {"lora_composer.pipeline", "lora_composer.fusion.base", "lora_composer.kernels.lora_ops"} <= set(graph)


def test_every_module_has_a_layer(graph):
    unplaced = sorted(m for m in graph if not unit_of(m))
    assert not unplaced, f"modules in no layer of tests/test_layers.py (place them): {unplaced}"


def test_imports_point_down_only(graph):
    wrong = []
    for module, targets in graph.items():
        mine = unit_of(module)
        for target in targets:
            theirs = unit_of(target)
            if theirs and theirs != mine and LEVEL[theirs] >= LEVEL[mine]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports from a lower layer into a higher one (or between peers):\n" + "\n".join(sorted(wrong))


def test_no_cycle_between_units(graph):
    """Independent of the layer table: a depth-first search over the unit graph finds no cycle."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        a = unit_of(module)
        edges.setdefault(a, set()).update(unit_of(t) for t in targets if unit_of(t) not in ("", a))
    state: dict[str, int] = {}

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = 1
        for nxt in edges.get(unit, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, unit, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, unit])
        state[unit] = 2

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, [])


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: an upward import and a relative one are both resolved and caught."""
    fake = tmp_path / "runtime_mod.py"
    fake.write_text("from ..pipeline import ComposerPipeline\n\ndef f():\n    import lora_composer.frontends.cli\n")
    found = _imports("lora_composer.runtime.runtime_mod", fake, {"lora_composer.frontends.cli"})
    assert found == {"lora_composer.pipeline", "lora_composer.frontends.cli"}
    assert all(LEVEL[unit_of(t)] > LEVEL["lora_composer.runtime"] for t in found)


def test_nothing_imports_a_folder_by_its_directory_name():
    """Every import uses the namespace: ``import retriever`` names another project's package (from the
    repository root it fails, or loads that package: ``lora_composer.source_tree``)."""
    import re

    repo = Path(__file__).resolve().parents[1]
    old = r"(composer|fusion|retriever|kernels)(\.[\w.]+)?"
    pattern = re.compile(rf"^\s*(from {old} import|import {old}\b)|import_module\(\"{old}\"|find_spec\(\"{old}\"", re.M)
    files = [
        p for d in ("composer", "fusion", "retriever", "kernels", "tests", "bench") for p in (repo / d).rglob("*.py")
    ]
    for name in ("test_packaging.py", "test_source_tree.py"):  # import Hugging Face's ``kernels`` on purpose
        files.remove(repo / "tests" / name)
    files += [repo / "app.py", *(repo / "notebooks").glob("*.ipynb")]
    wrong = [f"{p.relative_to(repo)}: {m.group(0).strip()}" for p in files for m in pattern.finditer(p.read_text())]
    assert not wrong, "imports by directory name instead of lora_composer...:\n" + "\n".join(wrong)
