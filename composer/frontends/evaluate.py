"""``compose eval``: measure every composition strategy and the retriever on the mini world.

    compose eval                          default protocol: 2, 3 and 4 LoRAs, 2 seeds, every strategy
    compose eval --sizes 2 --seeds 1 --strategies merge switch --out eval-out
    compose eval --world two-objects      two objects per picture: bleeding between them counts as failure
    compose eval --world community        LoRAs that teach variants of what the base draws (community regime)

The protocol and its measures: :mod:`lora_composer.miniworld.evaluate`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_composer.errors import ComposerError, one_line
from lora_composer.frontends.args import Parser, UsageError, command, load_pipeline

PROG = "compose eval"
WORLDS = ("one-object", "two-objects", "community")
TWO_OBJECT_STRATEGIES = (
    "merge",
    "gated",
    "loratorio",
    "conjunction",
    "composite",
    "regional",
)  # the default two-object table


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:6]),
    )
    p.add_argument(
        "--world",
        choices=WORLDS,
        default=WORLDS[0],
        help="one-object (default), two-objects (128x64, one object per half) or community (LoRAs teach "
        "variants of values the base knows); docs/EVAL.md",
    )
    p.add_argument(
        "--per-kind", type=int, default=4, metavar="N", help="two-objects: combinations of each kind (default 4)"
    )
    p.add_argument(
        "--base",
        choices=("one-object", "two-objects"),
        default="one-object",
        help="two-objects: the model rendering them, the one the LoRAs were trained on (one-object, "
        "default) or the base fine-tuned on two-object pictures (its text encoder changed)",
    )
    p.add_argument(
        "--auto",
        action="store_true",
        help="two-objects: every render picks its LoRAs with --loras auto from its words (regional: per region)",
    )
    p.add_argument(
        "--strategies",
        nargs="+",
        metavar="NAME",
        help="strategies to measure (default: every one in fusion/ but those fitted per set, such as fit: name them); NAME:ARGS measures a variant, "
        "e.g. 'marginal:scale=0.5 until=0.3'",
    )
    p.add_argument(
        "--sizes", nargs="+", type=int, default=[2, 3, 4], metavar="K", help="combination sizes (default 2 3 4)"
    )
    p.add_argument(
        "--combos",
        type=int,
        default=None,
        metavar="K",
        help="one-object, community: K combinations of each size, drawn with --seed (the same for every "
        "strategy of the run and every run with that seed); default: all",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="images per combination and strategy (default 2; two-objects, community: 1)",
    )
    p.add_argument("--steps", type=int, default=20, metavar="N", help="denoising steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, metavar="G", help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="first seed of the renders (default 0)")
    p.add_argument("--no-checks", dest="checks", action="store_false", help="skip the base/LoRA-alone checks")
    p.add_argument(
        "--no-retrieval",
        dest="retrieval",
        action="store_false",
        help="skip the retriever's figures (selection precision/recall, --loras auto end to end)",
    )
    p.add_argument(
        "--auto-combos",
        type=int,
        default=6,
        metavar="N",
        help="--loras auto vs hand-picked (merge), end to end: N combinations per size 1-4, captions and "
        "paraphrases, seed 2000 (16 N renders; default 6; 0: skip)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("eval-out"),
        metavar="DIR",
        help="folder for results.json and grid.png (default eval-out)",
    )
    p.add_argument(
        "--record",
        type=Path,
        metavar="JSON",
        help="also add this run to a record file (the package's results/<world>.json is what --help, the "
        "web UI and --strategy auto quote)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


@command(PROG)
def main(argv: list[str]) -> int:
    from lora_composer.fusion.registry import STRATEGIES, available, get_strategy, parse_strategy_args
    from lora_composer.miniworld import assets, world
    from lora_composer.miniworld.detectors import load_detector
    from lora_composer.miniworld.evaluate import evaluate, markdown

    args = build_parser().parse_args(argv)
    if args.combos is not None and (args.combos < 1 or args.world == "two-objects"):
        raise UsageError(
            "--combos must be at least 1"
            if args.combos < 1
            else "--combos draws one-object or community combinations; two-objects takes --per-kind"
        )
    if args.world == "two-objects":
        return _two_objects(args, argv)
    if args.world == "community":
        return _community(args, argv)
    args.seeds = 2 if args.seeds is None else args.seeds
    strategies = args.strategies or [s for s in available() if not STRATEGIES[s].regional and not STRATEGIES[s].fitted]
    unknown = [s for s in strategies if s.partition(":")[0] not in available()]
    if unknown:
        raise UsageError(f"unknown strategy {unknown[0].partition(':')[0]!r} (known: {', '.join(available())})")
    regional = [s for s in strategies if STRATEGIES[s.partition(":")[0]].regional]
    if regional:
        raise UsageError(f"{regional[0]} needs a picture with regions: measure it with --world two-objects")
    for spec in strategies:  # arguments checked before anything renders
        name, _, text = spec.partition(":")
        get_strategy(name, **parse_strategy_args(text))
    if any(k < 1 or k > len(world.CATEGORIES) for k in args.sizes):
        raise UsageError(f"--sizes must be between 1 and {len(world.CATEGORIES)}")
    pipe = load_pipeline(str(assets.model_dir()), assets.library_dir())
    try:
        detector = load_detector(assets.detector_path())
    except ValueError as exc:
        raise ComposerError(f"{assets.detector_path()}: {exc}") from None
    result = evaluate(
        pipe,
        detector,
        strategies,
        sizes=tuple(args.sizes),
        seeds=args.seeds,
        steps=args.steps,
        guidance=assets.DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
        seed=args.seed,
        grid_path=args.out / "grid.png",
        checks=args.checks,
        progress=not args.quiet,
        retrieval=args.retrieval,
        auto_per_size=max(args.auto_combos, 0),
        per_size=args.combos,
    )
    _save(args, argv, result)
    text = markdown(result, f"{PROG} {' '.join(argv)}".strip())
    print(text)
    return 0


def _save(args, argv: list[str], result: dict) -> None:
    """results.json in ``--out``; with ``--record``, the run added to that record file."""
    from lora_composer import measured

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        try:
            measured.record(args.record, result, f"{PROG} {' '.join(argv)}".strip(), args.world)
        except (ValueError, OSError) as exc:
            raise ComposerError(f"--record {args.record}: {one_line(exc)}") from None


def _check_strategies(strategies) -> None:
    from lora_composer.fusion.registry import available, get_strategy, parse_strategy_args

    unknown = [s for s in strategies if s.partition(":")[0] not in available()]
    if unknown:
        raise UsageError(f"unknown strategy {unknown[0].partition(':')[0]!r} (known: {', '.join(available())})")
    for spec in strategies:
        name, _, text = spec.partition(":")
        get_strategy(name, **parse_strategy_args(text))


def _two_objects(args, argv: list[str]) -> int:
    """``--world two-objects``: the two-object table (lora_composer.miniworld.two_objects)."""
    from lora_composer.miniworld import assets, two_objects

    strategies = args.strategies or list(TWO_OBJECT_STRATEGIES)
    _check_strategies(strategies)
    if args.per_kind < 1:
        raise UsageError("--per-kind must be at least 1")
    judge = two_objects.default_judge(seeds=1 if args.seeds is None else args.seeds, unet=args.base)
    judge.auto = args.auto
    judge.steps = args.steps
    judge.guidance = assets.DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    result = two_objects.evaluate(
        judge,
        strategies,
        per_kind=args.per_kind,
        seed=args.seed,
        checks_too=args.checks,
        progress=not args.quiet,
        grid_path=args.out / "grid.png",
    )
    _save(args, argv, result)
    print(two_objects.markdown(result, f"{PROG} {' '.join(argv)}".strip()))
    return 0


def _community(args, argv: list[str]) -> int:
    """``--world community``: the community world's table (lora_composer.miniworld.community_eval)."""
    from lora_composer.miniworld import assets, community_eval

    strategies = args.strategies or list(community_eval.STRATEGIES)
    _check_strategies(strategies)
    if any(k < 1 or k > len(community_eval.LORAS) for k in args.sizes):
        raise UsageError(f"--sizes must be between 1 and {len(community_eval.LORAS)}")
    result = community_eval.evaluate(
        community_eval.load_pipeline(),
        community_eval.load_judge(),
        strategies,
        sizes=tuple(args.sizes),
        seeds=1 if args.seeds is None else args.seeds,
        steps=args.steps,
        guidance=assets.DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
        seed=args.seed,
        grid_path=args.out / "grid.png",
        with_checks=args.checks,
        progress=not args.quiet,
        per_size=args.combos,
    )
    _save(args, argv, result)
    print(community_eval.markdown(result, f"{PROG} {' '.join(argv)}".strip()))
    return 0
