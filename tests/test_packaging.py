"""Packaging facts the project relies on."""

import importlib
import importlib.util


def test_top_level_kernels_is_not_mistaken_for_huggingface_kernels():
    # Our ``kernels/`` package shares its name with the Hugging Face ``kernels`` distribution; diffusers
    # must only treat that one as present (it checks the distribution), or it would call into ours.
    from diffusers.utils import is_kernels_available

    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin.replace("\\", "/").endswith("kernels/__init__.py")
    assert not is_kernels_available()


def test_top_level_packages_import():
    for name in ("composer", "retriever", "fusion", "kernels", "lora_composer.pipeline", "lora_composer.cli"):
        assert importlib.import_module(name) is not None


