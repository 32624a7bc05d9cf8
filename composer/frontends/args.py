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
import sys

from lora_composer.errors import ComposerError


class UsageError(Exception):
    """The command line cannot be run as typed."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` instead of printing the usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc`` (naming the file for an ``OSError`` that does not)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


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


def load_pipeline(model: str, library=None):
    """``ComposerPipeline.from_pretrained`` for a front end: loading bars hidden, library errors in one line."""
    from lora_composer.pipeline import ComposerPipeline

    try:
        with no_loading_bars():
            return ComposerPipeline.from_pretrained(model, library=library)
    except ComposerError:
        raise
    except Exception as exc:  # diffusers/transformers/hub errors: multi-line, not the user's traceback
        raise ComposerError(f"cannot load model {model}: {one_line(exc)}") from None
