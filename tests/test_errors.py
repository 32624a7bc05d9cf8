"""Every error a user can cause is a ComposerError (a front end catches one class and prints one line)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import lora_composer
from lora_composer.errors import ComposerError, one_line

# Exceptions that are not errors a user caused: control flow between the server's threads.
NOT_USER_ERRORS = {"lora_composer.serving.jobs.Cancelled"}


def _package_exceptions() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(lora_composer.__path__, "lora_composer."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    for sub in ("fusion", "retriever", "kernels"):  # the card's other folders, installed under lora_composer
        package = importlib.import_module(f"lora_composer.{sub}")
        for info in pkgutil.walk_packages(package.__path__, f"lora_composer.{sub}."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                    found[f"{info.name}.{name}"] = obj
    return found


def test_every_error_class_of_the_package_is_a_composer_error():
    found = _package_exceptions()
    names = {n.rsplit(".", 1)[-1] for n in found}
    assert {"KindError", "FormatError", "RequestError", "UsageError", "QueueFull", "ShuttingDown"} <= names
    outside = sorted(n for n, cls in found.items() if not issubclass(cls, ComposerError) and n not in NOT_USER_ERRORS)
    assert not outside, f"error classes outside ComposerError: {outside}"


@pytest.mark.parametrize(
    "exc, want",
    [
        (ValueError("first line\nsecond line"), "first line"),
        (ValueError("\n  \n  indented first  \nnext"), "indented first"),
        (KeyError(), "KeyError"),
        (
            FileNotFoundError(2, "No such file or directory", "/tmp/x.safetensors"),
            "[Errno 2] No such file or directory: '/tmp/x.safetensors'",
        ),
    ],
)
def test_one_line(exc, want):
    assert one_line(exc) == want
