"""Pool community-world runs over held-out seeds: the table docs/EVAL.md shows under "Pooled".

    python -m bench.miniworld.community_pooled --dev build/ceval/1000 --held-out build/ceval/3000 build/ceval/5000

Each folder holds a ``results.json`` written by ``compose eval --world community --out DIR``. Rates pool the
pictures (each run's ``by_combination`` counts), so seeds with more pictures weigh more; "subject + style"
counts the pictures whose set asks for both the creature variant (a subject) and the dashed style, K-LoRA's
case.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SUBJECT, STYLE = "cyclops", "dashed"


def _load(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _counts(result: dict, name: str, keep) -> tuple[int, int]:
    hit = shown = 0
    for combo, (h, n) in result["strategies"][name]["by_combination"].items():
        if keep(combo.split("+")):
            hit, shown = hit + h, shown + n
    return hit, shown


def pooled(dev: dict, held: list[dict]) -> str:
    """The markdown table: held-out all-concepts rate per size, per concept, base-concept confidence, and the
    subject + style pictures on the development and the held-out seeds."""
    sizes = dev["protocol"]["sizes"]
    head = " | ".join(f"held-out all, {k}" for k in sizes)
    lines = [
        f"| strategy | {head} | per concept | base-concept confidence | subject+style: development | held out |",
        "|---|" + "---|" * (len(sizes) + 4),
    ]
    pair = lambda combo: SUBJECT in combo and STYLE in combo  # noqa: E731
    for name in dev["strategies"]:
        rates = []
        for k in sizes:
            hit = sum(_counts(r, name, lambda c, k=k: len(c) == k)[0] for r in held)
            shown = sum(_counts(r, name, lambda c, k=k: len(c) == k)[1] for r in held)
            rates.append(f"{hit / shown:.2f}" if shown else "-")
        images = sum(r["strategies"][name]["images"] for r in held)
        concept = sum(r["strategies"][name]["per_concept"] * r["strategies"][name]["images"] for r in held) / images
        confidence = sum(r["strategies"][name]["base_confidence"] * r["strategies"][name]["images"] for r in held)
        d_hit, d_shown = _counts(dev, name, pair)
        h_hit = sum(_counts(r, name, pair)[0] for r in held)
        h_shown = sum(_counts(r, name, pair)[1] for r in held)
        lines.append(
            f"| {name} | {' | '.join(rates)} | {concept:.2f} | {confidence / images:.3f} | "
            f"{d_hit}/{d_shown} | {h_hit}/{h_shown} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.miniworld.community_pooled", description=__doc__.splitlines()[0])
    p.add_argument("--dev", type=Path, required=True, help="the development seed's compose eval --out folder")
    p.add_argument("--held-out", type=Path, nargs="+", required=True, help="the held-out seeds' folders")
    args = p.parse_args(argv)
    print(pooled(_load(args.dev), [_load(f) for f in args.held_out]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
