"""Packaging: the wheel holds one import namespace (``lora_composer``) with every subpackage and the mini
world weights; it lives next to Hugging Face's ``kernels`` package; ``import lora_composer`` stays cheap."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> where pyproject's package-dir puts it in the installed tree
PACKAGE_DIRS = {
    "composer": "lora_composer",
    "fusion": "lora_composer/fusion",
    "retriever": "lora_composer/retriever",
    "kernels": "lora_composer/kernels",
}
WEIGHTS = "composer/miniworld/weights"
NETWORK_ERRORS = (
    "NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "Max retries exceeded", "ProxyError",
    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
    "Could not fetch URL",
)  # fmt: skip


def _run(code: str, cwd: Path, pythonpath: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code`` in ``cwd`` (never the repo root: it would put ``composer/``... on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _under(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


# -- (a) next to Hugging Face's kernels -----------------------------------------------------------------

COEXIST = """
    import json, sys
    import numpy as np
    import torch
    torch.set_num_threads(2)

    import kernels
    from diffusers.utils import is_kernels_available
    import lora_composer.kernels as ours
    from lora_composer.kernels import stacked_delta
    from lora_composer import ComposerPipeline, tiny

    call = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np")
    pipe = tiny.build_tiny_sd15_pipeline(seed=0)
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **call).images
    lora = tiny.save_diffusers_lora(pipe, tiny.random_lora_layers(pipe, rank=4, seed=1), "a.safetensors", rank=4)
    got = ComposerPipeline(pipe)("a red circle", loras=[(str(lora), 1.0)], seed=0, progress=False, **call)
    got = np.asarray(got)
    print(json.dumps({
        "hf_file": kernels.__file__, "hf_get_kernel": hasattr(kernels, "get_kernel"),
        "ours_file": ours.__file__, "stacked_delta_file": sys.modules[stacked_delta.__module__].__file__,
        "diffusers_sees_kernels": is_kernels_available(),
        "base_shape": list(base.shape), "base_finite": bool(np.isfinite(base).all()),
        "lora_shape": list(got.shape), "lora_finite": bool(np.isfinite(got).all()),
        "lora_effect": float(np.abs(got - base).max()),
    }))
"""


def test_lives_next_to_huggingface_kernels(tmp_path):
    """Hugging Face's ``kernels`` owns the top-level name; ours is ``lora_composer.kernels``. With both
    present, diffusers sees theirs, and pipelines (with and without our LoRAs) still render.

    Installed with ``--no-deps``: its other requirements (huggingface_hub, packaging, pyyaml, tomlkit) are
    our dependencies' too; ``sigstore`` is only imported by ``kernels.verify``, which this does not use."""
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--retries", "1",
         "--timeout", "20", "--target", str(site), "kernels"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    output = pip.stdout + pip.stderr
    if pip.returncode != 0 and any(marker in output for marker in NETWORK_ERRORS):
        pytest.skip(f"PyPI cannot be reached to install Hugging Face's kernels: {output.strip().splitlines()[-1]}")
    assert pip.returncode == 0, output

    work = tmp_path / "cwd"
    work.mkdir()
    got = _last_json(_run(COEXIST, cwd=work, pythonpath=site, timeout=240))

    assert _under(got["hf_file"], site) and got["hf_get_kernel"], got
    assert _under(got["ours_file"], REPO / "kernels") and _under(got["stacked_delta_file"], REPO / "kernels"), got
    assert got["diffusers_sees_kernels"] is True
    assert got["base_shape"] == got["lora_shape"] == [1, 64, 64, 3] and got["base_finite"] and got["lora_finite"]
    assert got["lora_effect"] > 1e-3  # the LoRA was applied: same seed, different image


# -- (b) the wheel ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, the source copy it was built from). Built from a copy of the tree so that a stale ``build/``
    in the repo (setuptools reuses it) cannot add or hide files, and the repo gets no build output."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in PACKAGE_DIRS:
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (whl,) = (tmp / "dist").glob("lora_composer-*.whl")
    return whl, src


def _names(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as zf:
        return {n for n in zf.namelist() if not n.endswith("/")}


def test_wheel_has_one_top_level_name(wheel):
    tops = {n.split("/")[0] for n in _names(wheel[0])}
    assert "lora_composer" in tops
    others = {t for t in tops if t != "lora_composer" and not re.fullmatch(r"lora_composer-[^/]+\.(dist-info|data)", t)}
    assert not others, f"the wheel installs other top-level names: {sorted(others)}"


def test_wheel_has_every_module_of_the_source_tree(wheel):
    """A subpackage missing from pyproject's ``packages`` list is missing here."""
    whl, src = wheel
    names = _names(whl)
    expected = {
        f"{target}/{py.relative_to(src / folder).as_posix()}"
        for folder, target in PACKAGE_DIRS.items()
        for py in (src / folder).rglob("*.py")
        if (py.parent / "__init__.py").is_file()
    }
    assert expected, "no source modules found"
    missing = sorted(expected - names)
    assert not missing, f"in the source tree but not in the wheel: {missing}"


def _local_state(parts: tuple[str, ...]) -> bool:
    """Files a run leaves next to the weights (the catalog in ``.lora-composer/``, a user's ``uploads/``)."""
    return "uploads" in parts or any(p.startswith(".") for p in parts)


def test_wheel_carries_the_mini_world_weights(wheel):
    whl, src = wheel
    names = _names(whl)
    assert "lora_composer/miniworld/weights/model/model_index.json" in names
    loras = sorted((src / WEIGHTS / "loras").glob("*.safetensors"))
    assert len(loras) >= 2, loras
    expected = {
        f"lora_composer/miniworld/weights/{f.relative_to(src / WEIGHTS).as_posix()}"
        for f in (src / WEIGHTS).rglob("*")
        if f.is_file() and not _local_state(f.relative_to(src / WEIGHTS).parts)
    }
    missing = sorted(expected - names)
    assert not missing, f"weights not in the wheel: {missing}"


def test_wheel_console_script_imports_from_the_wheel(wheel, tmp_path):
    """``compose`` names a module:function that the unpacked wheel itself provides (not the repo)."""
    whl, _ = wheel
    with zipfile.ZipFile(whl) as zf:
        (ep_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        zf.extractall(tmp_path / "unpacked")
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(ep_name).decode())
    target = parser["console_scripts"]["compose"].strip()
    module, _, func = target.partition(":")
    code = f"""
        import importlib, json
        import lora_composer
        mod = importlib.import_module({module!r})
        print(json.dumps({{"pkg": lora_composer.__file__, "mod": mod.__file__,
                           "callable": callable(getattr(mod, {func!r}, None))}}))
    """
    got = _last_json(_run(code, cwd=tmp_path, pythonpath=tmp_path / "unpacked"))
    assert _under(got["pkg"], tmp_path / "unpacked") and _under(got["mod"], tmp_path / "unpacked"), got
    assert got["callable"], f"{target} is not a function"


# -- (c) a cheap import ----------------------------------------------------------------------------------

PUBLIC_API = {
    "ComposerPipeline", "load_adapter", "save_adapter", "Adapter", "LoraRuntime", "get_strategy", "Strategy",
    "StepPlan", "Catalog", "GenerationRecord", "save_png", "read_png", "ComposerError", "AdapterLoadError",
    "AdapterMismatchError", "__version__",
}  # fmt: skip

LAZY = """
    import json, sys
    import lora_composer
    heavy_at_import = sorted(m for m in ("torch", "diffusers") if m in sys.modules)
    from lora_composer import ComposerPipeline
    unresolved = [n for n in lora_composer.__all__ if getattr(lora_composer, n, None) is None]
    try:
        lora_composer.no_such_name
        unknown = "resolved"
    except AttributeError:
        unknown = "AttributeError"
    print(json.dumps({"heavy_at_import": heavy_at_import, "pipeline": ComposerPipeline.__name__,
                      "all": lora_composer.__all__, "unresolved": unresolved, "unknown": unknown,
                      "dir_has_all": set(lora_composer.__all__) <= set(dir(lora_composer))}))
"""


def test_import_is_lazy_and_every_public_name_resolves(tmp_path):
    got = _last_json(_run(LAZY, cwd=tmp_path))
    assert got["heavy_at_import"] == [], "import lora_composer must not import torch or diffusers"
    assert got["pipeline"] == "ComposerPipeline"
    assert set(got["all"]) == PUBLIC_API and len(got["all"]) == len(PUBLIC_API)
    assert got["unresolved"] == [] and got["dir_has_all"], got
    assert got["unknown"] == "AttributeError"
