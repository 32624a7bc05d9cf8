"""Run every benchmark: ``python -m bench [--tiny] [--no-write] [--threads N]``."""

from __future__ import annotations

import sys

from bench import (
    attach,
    dit,
    fuse_cycles,
    gpu,
    kernels,
    kinds,
    retrieval,
    row_groups,
    serve_load,
    serve_ray,
    shira_switch,
    strategies,
    switch_weights,
)

BENCHMARKS = (
    switch_weights,
    fuse_cycles,
    strategies,
    shira_switch,
    kernels,
    kinds,
    dit,
    gpu,
    retrieval,
    attach,
    row_groups,
    serve_load,
    serve_ray,
)


def main(argv: list[str] | None = None) -> list:
    argv = sys.argv[1:] if argv is None else argv
    known = {"--tiny", "--no-write"}
    shared, i = [], 0
    while i < len(argv):  # only the flags every benchmark understands are passed on
        if argv[i] in known:
            shared.append(argv[i])
        elif argv[i] == "--threads" and i + 1 < len(argv):
            shared += argv[i : i + 2]
            i += 1
        else:
            raise SystemExit(f"python -m bench: unknown argument {argv[i]!r} (run one benchmark for its own options)")
        i += 1
    return [bench.main(shared) for bench in BENCHMARKS]


if __name__ == "__main__":
    main()
