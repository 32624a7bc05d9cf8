"""The one command-line idiom of every ``compose`` command: errors are one line and exit code 2.

A command is ``fn(argv) -> int`` decorated with :func:`command`; it parses with :class:`Parser` and raises
:class:`UsageError` (what was typed is wrong: the line points at ``--help``) or
:class:`~lora_composer.errors.ComposerError` / ``OSError`` (a file, model or LoRA is wrong). Nothing prints a
traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from lora_composer.errors import ComposerError, one_line

HUB_TIMEOUT_S = 3.0  # how long a Hub id waits for the Hub to answer before failing

# ``x``, `x`, :role:`x` and :role:`~a.b.x` (reStructuredText in docstrings used as help) -> x
_RST = re.compile(r"(?::[a-z]+(?::[a-z]+)?:)?(`{1,2})(~?)([^`]+?)\1")


def plain(text: str) -> str:
    """Help text without reStructuredText markup: ``compose``, :class:`~a.B` -> compose, B."""
    return _RST.sub(lambda m: m.group(3).rsplit(".", 1)[-1] if m.group(2) else m.group(3), text)


class UsageError(ComposerError):
    """The command line cannot be run as typed."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` instead of printing the usage and exiting;
    its help is plain text (docstrings used as descriptions lose their reStructuredText markup)."""

    def error(self, message):
        raise UsageError(message)

    def format_help(self):
        return plain(super().format_help())


def command(prog: str):
    """Turn ``fn(argv) -> int`` into a command: ``argv`` defaults to ``sys.argv[1:]``; usage errors, our
    errors and OS errors print ``PROG: error: ...`` on one line and return 2; Ctrl-C returns 130."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            try:
                return int(fn(argv) or 0)
            except UsageError as exc:
                print(f"{prog}: error: {one_line(exc)} (see {prog} --help)", file=sys.stderr)
            except (ComposerError, OSError) as exc:
                print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
            except SystemExit as exc:  # --help, --version
                return exc.code if isinstance(exc.code, int) else 0
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            return 2

        return run

    return wrap


@contextlib.contextmanager
def no_loading_bars():
    """Hide diffusers' and transformers' "Loading ..." bars: the denoising bar is the one that matters."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    before = (d_logging.is_progress_bar_enabled(), t_logging.is_progress_bar_enabled())
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before[0]:
            d_logging.enable_progress_bar()
        if before[1]:
            t_logging.enable_progress_bar()


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (``None`` if it answers within :data:`HUB_TIMEOUT_S`)."""
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connection says nothing: let the download try
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except socket.gaierror:
        return f"{host}: name not resolved"
    except TimeoutError:
        return f"{host}: no answer in {HUB_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"{host}: {exc.strerror or exc or type(exc).__name__}"
    return None


def model_source(model: str) -> dict:
    """Fail fast, in one line, when ``model`` is neither a local folder nor loadable from the Hub (offline
    and not cached, or the Hub does not answer within a few seconds); returns extra ``from_pretrained``
    arguments (``local_files_only=True`` for a cached id while the Hub is out of reach)."""
    if Path(model).expanduser().exists():
        return {}
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: the loader says why
        cached = False
    if _offline():
        if cached:
            return {"local_files_only": True}
        raise ComposerError(
            f"model {model}: neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    why = _hub_unreachable()
    if why is None:
        return {}
    if cached:
        return {"local_files_only": True}
    raise ComposerError(f"model {model}: neither a local folder nor reachable on the Hugging Face Hub ({why})")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``compose ui`` / ``serve`` guard other binds)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str) -> None:
    """Send the library's log records at ``level`` and above to stderr, one line each (other libraries'
    loggers are left as they are)."""
    import logging

    logger = logging.getLogger("lora_composer")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_lora_composer", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._lora_composer = True
        logger.addHandler(handler)


def add_log_args(p: argparse.ArgumentParser, default: str = "warning") -> None:
    """``--log-level``, shared by ``compose``, ``compose ui`` and ``compose serve`` (each passes it to
    :func:`configure_logging` once parsed)."""
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default,
        help=f"what the library logs to stderr (default {default}; a request that fails inside the "
        "server is logged with its traceback at error)",
    )


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, shared by ``compose``, ``compose ui`` and ``compose serve``
    (:func:`lora_composer.devices.device_and_dtype` reads them)."""
    from lora_composer.devices import DTYPES

    p.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help="where the model runs: auto (cuda if there is one, else mps, else the CPU), cuda, cuda:1, mps, cpu",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="the weights' precision: auto (fp32 on the CPU; on a GPU bf16 for FLUX.1 and SD3, fp16 for "
        "the others), fp32, fp16, bf16",
    )


def check_torchvision() -> None:
    """A torchvision built for another torch (what a CPU install gets when the CPU index is out of reach) breaks
    every transformers / peft import in a long traceback; say so in one line with the install that fixes it."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure here is the mismatch (or a broken install)
        import torch

        major, minor, patch = (torch.__version__.split("+")[0].split(".") + ["0", "0"])[:3]
        want = f"0.{int(minor) + 15}.{patch}" if major == "2" else "the release made for it"
        try:
            have = importlib.metadata.version("torchvision")
        except importlib.metadata.PackageNotFoundError:
            have = "?"
        fix = (
            f"pip install --force-reinstall torchvision=={want}" if have == want else f"pip install torchvision=={want}"
        )
        raise ComposerError(
            f"torchvision {have} does not work with torch {torch.__version__} ({one_line(exc)}): "
            f"install the matching one from the same index as torch, {fix}"
        ) from None


def load_pipeline(model: str, library=None, device: str | None = None, dtype=None):
    """``ComposerPipeline.from_pretrained`` for a front end: a Hub id fails fast when the Hub is out of reach
    (:func:`model_source`), loading bars hidden, library errors in one line. ``device``/``dtype``: as
    :func:`~lora_composer.devices.device_and_dtype` returns them (None: the CPU in float32)."""
    check_torchvision()
    from lora_composer.pipeline import ComposerPipeline

    extra = model_source(model)
    try:
        with no_loading_bars():
            return ComposerPipeline.from_pretrained(model, library=library, torch_dtype=dtype, device=device, **extra)
    except ComposerError:
        raise
    except Exception as exc:  # diffusers/transformers/hub errors: multi-line, not the user's traceback
        raise ComposerError(f"cannot load model {model}: {one_line(exc)}") from None
