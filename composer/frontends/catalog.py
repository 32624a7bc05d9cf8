"""``compose index DIR``, ``compose search "PROMPT"`` and ``compose train-retriever``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lora_composer.errors import ComposerError
from lora_composer.frontends.args import Parser, UsageError, command, load_pipeline


def _library(args) -> Path:
    from lora_composer.default_model import resolve

    lib = getattr(args, "library", None) or os.environ.get("LORA_COMPOSER_LIBRARY")
    if lib is None:  # the default model's own library, if that is the model
        lib = resolve(getattr(args, "model", None))[1]
    if lib is None:
        raise ComposerError("no LoRA library: pass --library DIR (or set LORA_COMPOSER_LIBRARY)")
    root = Path(lib).expanduser()
    if not root.is_dir():
        raise ComposerError(f"LoRA library {root} is not a folder")
    return root


def _load_pipe(model: str | None):
    from lora_composer.default_model import resolve

    return load_pipeline(resolve(model)[0]).pipe


def _print_report(report, root: Path, quiet: bool) -> None:
    print(
        f"indexed {report.indexed} file(s) ({len(report.added)} new, {len(report.updated)} changed), "
        f"{report.unchanged} unchanged, {len(report.removed)} removed, {len(report.skipped)} skipped "
        f"in {report.seconds:.1f} s"
    )
    for path, reason in report.skipped:
        try:
            shown = os.path.relpath(path, root)
        except ValueError:
            shown = path
        print(f"  skipped {shown}: {reason}")


@command("compose index")
def index(argv: list[str]) -> int:
    p = Parser(prog="compose index", description="Index (incrementally) the LoRA files of a folder into its catalog.")
    p.add_argument("library", metavar="DIR", help="folder of LoRA files (searched recursively)")
    p.add_argument(
        "--catalog",
        metavar="FILE",
        help="catalog file (default: DIR/.lora-composer/catalog.sqlite, or one in the user cache when DIR is read-only or inside the installed package)",
    )
    p.add_argument("--model", metavar="DIR_OR_ID", help="also embed descriptions with this model's text encoder now")
    p.add_argument("--rebuild", action="store_true", help="delete the catalog first and index everything again")
    p.add_argument(
        "--allow-pickle",
        dest="allow_pickle",
        action="store_true",
        help="also read .pt/.ckpt/.bin files (they can run code)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from lora_composer.retriever.catalog import Catalog, default_catalog_path

    root = Path(args.library).expanduser()
    if not root.is_dir():
        raise ComposerError(f"{root} is not a folder")
    path = Path(args.catalog) if args.catalog else default_catalog_path(root)
    if args.rebuild:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    with Catalog(path, root=root) as cat:
        report = cat.index(root, progress=not args.quiet, allow_pickle=args.allow_pickle)
        if args.model:
            from lora_composer.retriever.encoder import TextEncoder

            enc = TextEncoder(_load_pipe(args.model))
            n = cat.ensure_text_embeddings(enc)
            from lora_composer.retriever.search import Retriever

            Retriever(cat, enc).refresh()  # a large family's vector index: built (or brought up to date) now
            if not args.quiet:
                print(f"embedded {n} description(s) with {args.model}'s text encoder", file=sys.stderr)
        _print_report(report, root, args.quiet)
        print(f"catalog: {path} ({cat.count()} adapters)")
    return 0


@command("compose search")
def search(argv: list[str]) -> int:
    p = Parser(prog="compose search", description="Rank the library's LoRAs for a prompt (no image is rendered).")
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--library", metavar="DIR", help="folder of LoRA files (default: $LORA_COMPOSER_LIBRARY)")
    p.add_argument(
        "--model",
        "-m",
        metavar="DIR_OR_ID",
        help="base model: its family and text encoder (default: the mini world model)",
    )
    p.add_argument(
        "--catalog",
        metavar="FILE",
        help="catalog file (default: DIR/.lora-composer/catalog.sqlite, or one in the user cache when DIR is read-only or inside the installed package)",
    )
    p.add_argument("--limit", "-k", type=int, default=10, metavar="N", help="rows to show (default 10)")
    p.add_argument(
        "--top-k",
        dest="top_k",
        type=int,
        default=None,
        metavar="K",
        help="mark the adapters --loras auto would choose with this K",
    )
    p.add_argument(
        "--min-score",
        dest="min_score",
        type=float,
        default=None,
        metavar="S",
        help="one floor for every claim kind of --loras auto's choice (default: the calibrated ones)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from lora_composer.retriever import DEFAULT_TOP_K, retriever_for
    from lora_composer.retriever.search import format_selection, format_table

    root = _library(args)
    pipe = _load_pipe(args.model)
    r = retriever_for(pipe, root, catalog=args.catalog, progress=not args.quiet)
    matches = r.search(args.prompt, limit=max(args.limit, 1))
    print(f"{len(r.rows)} {r.family} adapter(s) in {r.catalog.path}")
    print(format_table(matches, root) if matches else "no adapter matches this prompt")
    chosen = r.select(args.prompt, args.top_k or DEFAULT_TOP_K, args.min_score)
    print(format_selection(chosen))
    skipped = r.catalog.skipped()
    if skipped and not args.quiet:
        print(f"({len(skipped)} file(s) could not be indexed; compose index {root} lists them)", file=sys.stderr)
    return 0


@command("compose train-retriever")
def train(argv: list[str]) -> int:
    p = Parser(
        prog="compose train-retriever",
        description="Train the learned weight encoder on the library's described LoRAs (saved in DIR/.lora-composer/).",
    )
    p.add_argument("library", metavar="DIR", help="folder of LoRA files (indexed first, incrementally)")
    p.add_argument("--epochs", type=int, default=200, metavar="N", help="training epochs (default 200)")
    p.add_argument(
        "--model",
        "-m",
        metavar="DIR_OR_ID",
        help="base model: its family and text encoder (default: the mini world model)",
    )
    p.add_argument(
        "--catalog",
        metavar="FILE",
        help="catalog file (default: DIR/.lora-composer/catalog.sqlite, or one in the user cache when DIR is read-only or inside the installed package)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    from lora_composer.retriever.catalog import Catalog, default_catalog_path
    from lora_composer.retriever.encoder import TextEncoder
    from lora_composer.retriever.signals import learned

    root = Path(args.library).expanduser()
    if not root.is_dir():
        raise ComposerError(f"{root} is not a folder")
    enc = TextEncoder(_load_pipe(args.model))
    with Catalog(Path(args.catalog) if args.catalog else default_catalog_path(root), root=root) as cat:
        report = cat.index(root, progress=not args.quiet)
        if report.indexed or report.skipped:
            _print_report(report, root, args.quiet)
        cat.encoder_mean(enc)
        path, info = learned.train_for_library(cat, root, enc, epochs=args.epochs)
    print(
        f"trained the learned weight encoder on {info['adapters']} described {enc.family} adapter(s), "
        f"{info['epochs']} epochs, InfoNCE {info['loss_before']:.3f} -> {info['loss_after']:.3f} "
        f"in {info['seconds']:.1f} s; embedded {info['embedded']} adapter(s)"
    )
    print(f"model: {path} (used by compose search and --loras auto with LORA_COMPOSER_LEARNED=1)")
    return 0
