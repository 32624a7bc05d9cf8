"""Record ``compose eval``'s one-object tables in docs/EVAL.md, the rest of the file untouched.

It runs ``compose eval`` with the options given and puts its tables between the doc's
``<!-- eval:results -->`` markers.

    python -m bench.miniworld.eval_doc --out eval-out                  # the tables docs/EVAL.md quotes
    python -m bench.miniworld.eval_doc --doc OTHER.md --sizes 2 --seeds 1

Every option but ``--doc`` is ``compose eval``'s. A development tool: the installed package never edits the
repository's documentation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "python -m bench.miniworld.eval_doc"
DOC = Path(__file__).resolve().parents[2] / "docs" / "EVAL.md"
START, END = "<!-- eval:results -->", "<!-- /eval:results -->"


def write_doc(doc: Path, section: str) -> None:
    """Replace the text between the eval markers in ``doc`` (or append it)."""
    text = doc.read_text() if doc.exists() else "# Evaluation on the mini world\n\n"
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    from lora_composer.frontends.args import UsageError
    from lora_composer.frontends.evaluate import build_parser
    from lora_composer.frontends.evaluate import main as compose_eval
    from lora_composer.miniworld.evaluate import markdown

    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="Every other option is compose eval's (compose eval --help).",
        allow_abbrev=False,
    )
    p.add_argument("--doc", type=Path, default=DOC, help=f"the Markdown file to update (default {DOC})")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        options = build_parser().parse_args(rest)
    except UsageError:
        return compose_eval(rest)  # which says what is wrong, as compose eval does
    if options.world != "one-object":
        p.error("it records the one-object tables only; docs/EVAL.md quotes the two-object and community ones")
    code = compose_eval(rest)
    if code:
        return code
    result = json.loads((options.out / "results.json").read_text())
    write_doc(args.doc, markdown(result, f"compose eval {' '.join(rest)}".strip()))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
