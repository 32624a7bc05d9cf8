"""``compose convert``: LoRA -> SHiRA (sparse) and LoRA-Squeeze (lower rank), with a per-layer report.

compose convert --to shira --density 0.02 IN OUT     keep the 2% largest entries of each layer's delta
compose convert --rank 16 IN OUT                     re-factor each layer at rank 16 (randomized SVD)
compose convert --rank auto --energy 0.99 IN OUT     per layer, the smallest rank keeping 99% energy
"""

from __future__ import annotations

import argparse
import math

from lora_composer.errors import ComposerError
from lora_composer.frontends.args import Parser, UsageError, command

PROG = "compose convert"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("input", metavar="IN", help="LoRA file (.safetensors: diffusers/PEFT or kohya keys)")
    p.add_argument("output", metavar="OUT", help="file to write (.safetensors)")
    p.add_argument(
        "--to",
        choices=["shira", "lora"],
        default=None,
        help="shira: sparse adapter (needs --density); lora (default with --rank): lower-rank LoRA",
    )
    p.add_argument("--density", type=float, default=None, help="fraction of each layer's entries kept (SHiRA)")
    p.add_argument("--rank", default=None, help="target rank, or 'auto' with --energy (LoRA-Squeeze)")
    p.add_argument("--energy", type=float, default=None, help="with --rank auto: squared-norm fraction to keep")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary line")
    return p


def _summary(reports, what: str) -> str:
    errs = [r.rel_error for r in reports if not r.note]
    energy = [r.energy for r in reports if not r.note]
    if not errs:
        return f"{what}: no layer converted"
    return (
        f"{what}: {len(errs)} layers; relative error median {sorted(errs)[len(errs) // 2]:.4f}, "
        f"max {max(errs):.4f}; retained energy min {min(energy):.4f}"
    )


@command(PROG)
def main(argv: list[str]) -> int:
    from lora_composer.adapters import load_adapter, save_adapter, save_shira
    from lora_composer.adapters.shira import lora_to_shira, squeeze_lora

    args = build_parser().parse_args(argv)
    to = args.to or ("lora" if args.rank is not None else None)
    if to is None:
        raise UsageError("give --to shira --density D, or --rank R / --rank auto --energy E")
    try:
        adapter = load_adapter(args.input)
        if adapter.is_sparse:
            raise ValueError(f"{args.input}: already a sparse (SHiRA) adapter")
        if to == "shira":
            if args.density is None:
                raise ValueError("--to shira needs --density (for example 0.02)")
            out, reports = lora_to_shira(adapter, args.density)
            path = save_shira(out, args.output)
            head = f"{'layer':<60} {'kept':>9} {'of':>10} {'rel. error':>10}"
            rows = [
                f"{r.key:<60} {r.kept:>9} {r.of:>10} {r.rel_error:>10.4f}" + (f"  {r.note}" if r.note else "")
                for r in reports
            ]
            nnz = sum(r.kept for r in reports)
            total = sum(r.of for r in reports) or 1
            summary = (
                _summary(reports, f"SHiRA at density {args.density:g}") + f"; {nnz:,} nonzeros ({nnz / total:.2%})"
            )
            convs = sum(1 for d in out.deltas.values() if d.is_conv)  # what a LoCon draws lives in these
            summary += f"; kept {len(out.deltas) - convs} Linear + {convs} Conv2d layers of {len(adapter.deltas)}"
        else:
            if args.rank is None:
                raise ValueError("--to lora needs --rank R or --rank auto --energy E")
            if args.rank == "auto":
                if args.energy is None:
                    raise ValueError("--rank auto needs --energy (for example 0.99)")
                out, reports = squeeze_lora(adapter, energy=args.energy)
            else:
                if args.energy is not None:
                    raise ValueError("--energy goes with --rank auto")
                try:
                    rank = int(args.rank)
                except ValueError:
                    raise ValueError(f"--rank must be an integer or 'auto', got {args.rank!r}") from None
                out, reports = squeeze_lora(adapter, rank=rank)
            path = save_adapter(out, args.output)
            head = f"{'layer':<60} {'rank':>5} {'was':>5} {'energy':>8} {'rel. error':>10}"
            rows = [
                f"{r.key:<60} {r.kept:>5} {r.of:>5} {r.energy:>8.4f} {r.rel_error:>10.4f}"
                + (f"  {r.note}" if r.note else "")
                for r in reports
            ]
            ranks = [r.kept for r in reports if r.kept]
            summary = _summary(
                reports, f"LoRA-Squeeze to rank {args.rank}" + (f" (energy {args.energy:g})" if args.energy else "")
            )
            if ranks:
                summary += f"; ranks {min(ranks)}-{max(ranks)}, mean {sum(ranks) / len(ranks):.1f}"
    except ValueError as e:  # the options do not fit this file
        raise ComposerError(" ".join(str(e).split())) from None
    if not args.quiet:
        print(head)
        print("\n".join(rows))
    print(summary)
    print(f"wrote {path}")
    return 0 if all(math.isfinite(r.rel_error) for r in reports) else 1
