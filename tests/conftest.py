"""Shared fixtures: tiny pipelines built once per session and copied per test, LoRA files on demand."""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and diffusers.hooks (the denoiser driver)
# imports it: without CUDA the kernel tests need the interpreter, so it is chosen before any test module runs.
# On a GPU the variable is left alone (``TRITON_INTERPRET=0 pytest tests/test_kernels_triton.py -k cuda``).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# What the suite first takes from each dependency it cannot run without (transformers and diffusers import
# their models lazily, so a class is named). CI installs the newest releases (README): one that breaks an
# import stops the run here in one line naming it, instead of a collection error in every test file.
DEPENDENCY_PROBES = ("torch.nn", "safetensors.torch", "transformers:CLIPTextModel", "diffusers:UNet2DConditionModel",
                     "peft:LoraConfig")  # fmt: skip


@functools.cache
def _version(module: str) -> str:
    """'transformers 5.25.0': the distribution that installs ``module`` and its version."""
    top = module.split(":")[0].split(".")[0]
    name = importlib.metadata.packages_distributions().get(top, [top])[0]
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name} (not installed)"


def _owner(filename: str) -> str | None:
    """The top-level module a source file belongs to, by the ``sys.path`` entry it lies under."""
    path = Path(filename).resolve()
    entries = [Path(e or os.curdir).resolve() for e in sys.path]
    base = max((e for e in entries if path.is_relative_to(e) and path != e), key=lambda e: len(e.parts), default=None)
    return None if base is None else Path(path.relative_to(base).parts[0]).stem


def _check_dependencies() -> None:
    for probe in DEPENDENCY_PROBES:
        module, _, attr = probe.partition(":")
        try:
            value = importlib.import_module(module)
            if attr:
                getattr(value, attr)
        except Exception as exc:  # noqa: BLE001 - any failure of a dependency's import is the news here
            while exc.__cause__ is not None:  # transformers and diffusers re-raise the real error with a vaguer one
                exc = exc.__cause__
            frames = traceback.extract_tb(exc.__traceback__)
            owner = _owner(frames[-1].filename) if frames else None
            what = f"from {module} import {attr}" if attr else f"import {module}"
            first = (str(exc).splitlines() or [""])[0]
            # SystemExit, not pytest.exit: raised while pytest loads this file, pytest.exit reads as an ImportError
            raise SystemExit(f"{_version(owner or module)}: `{what}` fails: {type(exc).__name__}: {first}")


def pytest_report_header() -> str:
    return "dependencies: " + ", ".join(_version(p) for p in DEPENDENCY_PROBES)


_check_dependencies()

from lora_composer import tiny  # noqa: E402 - after the checks above

# The suite runs in two processes (``pytest -n 2``, README): one torch thread each keeps two workers off each
# other's cores; run alone, a test gets two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def _sd15_template():
    return tiny.build_tiny_sd15_pipeline(seed=0)


@pytest.fixture(scope="session")
def _sdxl_template():
    return tiny.build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture
def sd15_pipe(_sd15_template):
    """A fresh tiny SD1.5-shaped pipeline (a deep copy: tests may patch it freely)."""
    return copy.deepcopy(_sd15_template)


@pytest.fixture
def sdxl_pipe(_sdxl_template):
    return copy.deepcopy(_sdxl_template)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One LORA_COMPOSER_HOME for the module (user caches), and no library from the environment."""
    path = tmp_path_factory.mktemp("lora-composer-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_COMPOSER_HOME", str(path))
        mp.delenv("LORA_COMPOSER_LIBRARY", raising=False)
        yield path


@pytest.fixture
def make_lora(tmp_path):
    """``make_lora(pipe, name, fmt="diffusers"|"kohya", rank=4, alpha=None, seed=0, conv=False, text_encoder=True)``
    writes a random LoRA for ``pipe`` with the reference writers and returns its path."""

    def _make(pipe, name, fmt="diffusers", rank=4, alpha=None, seed=0, conv=False, text_encoder=True, metadata=None):
        layers = tiny.random_lora_layers(pipe, rank=rank, seed=seed, conv=conv, text_encoder=text_encoder)
        path = tmp_path / f"{name}.safetensors"
        if fmt == "diffusers":
            return tiny.save_diffusers_lora(pipe, layers, path, rank=rank, alpha=alpha)
        if fmt == "kohya":
            return tiny.save_kohya_lora(layers, path, alpha=alpha, metadata=metadata)
        raise ValueError(fmt)

    return _make


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: layers as small as the tiny DiT pipelines' gain nothing from threads and
    lose much to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
