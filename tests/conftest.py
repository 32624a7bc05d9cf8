"""Shared fixtures: tiny pipelines built once per session and copied per test, LoRA files on demand."""

from __future__ import annotations

import copy
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and diffusers.hooks (the denoiser driver)
# imports it: without CUDA the kernel tests need the interpreter, so it is chosen before any test module runs.
# On a GPU the variable is left alone (``TRITON_INTERPRET=0 pytest tests/test_kernels_triton.py -k cuda``).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from lora_composer import tiny

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

