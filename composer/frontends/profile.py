"""``compose profile``: score LoRAs' high-frequency energy once, so ``--strategy cmlora`` orders them.

    compose profile --lora ink-style --lora castle-bg [--model DIR_OR_ID] [--library DIR] [--steps 20]

Renders the base and each adapter alone (CMLoRA's frequency profiling, see ``lora_composer.fusion.frequency``) and caches
the scores by file sha256; later ``cmlora`` generations read that cache and put high-frequency adapters
first. Files already profiled are not rendered again (``--refresh`` to redo them).
"""

from __future__ import annotations

import argparse
import os

from lora_composer.frontends.args import Parser, command, load_pipeline

PROG = "compose profile"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument(
        "--lora", action="append", required=True, metavar="PATH_OR_NAME", help="adapter to profile (repeatable)"
    )
    p.add_argument("--model", metavar="DIR_OR_ID", help="diffusers model (default: the mini world model)")
    p.add_argument("--library", metavar="DIR", help="folder to look LoRA names up in")
    p.add_argument(
        "--prompt", default="a detailed picture", help="prompt of the profiling renders (default: a detailed picture)"
    )
    p.add_argument("--steps", type=int, default=20, metavar="N", help="denoising steps per render (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the profiling renders (default 0)")
    p.add_argument("--refresh", action="store_true", help="render again even if a file was profiled")
    return p


@command(PROG)
def main(argv: list[str]) -> int:
    from lora_composer.default_model import resolve
    from lora_composer.fusion.frequency import profile_adapters

    args = build_parser().parse_args(argv)
    model, library = resolve(args.model, args.library or os.environ.get("LORA_COMPOSER_LIBRARY"))
    composer = load_pipeline(model, library)
    names = [composer.load_lora(ref).name for ref in args.lora]
    scores = profile_adapters(composer, names, args.prompt, steps=args.steps, seed=args.seed, refresh=args.refresh)
    for name, score in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"{score:.4f}  {name}")
    print("cmlora order (high frequency first): " + ", ".join(sorted(scores, key=lambda n: -scores[n])))
    return 0
