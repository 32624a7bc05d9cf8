"""The two-object world's checks beside ``compose eval --world two-objects``, as docs/EVAL.md quotes them.

``check``: the detectors on halves and the base model's sanity; ``alone``: each LoRA alone on one object.

    python -m bench.miniworld.two_object_checks check --threads 1   # detectors on halves, base sanity
    python -m bench.miniworld.two_object_checks alone --threads 1   # each LoRA alone on one side
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from lora_composer.miniworld import assets
from lora_composer.miniworld.detectors import load_detector
from lora_composer.miniworld.library import LORAS
from lora_composer.miniworld.two_objects import (
    SIDES,
    Judge,
    Tally,
    base_sanity,
    default_judge,
    detector_on_halves,
    pair_for,
)


def checks(seed: int = 0, prompts: int = 24) -> dict:
    """The detectors on halves, then the base check (no LoRA) with the one-object and the two-object UNet."""
    det = load_detector(assets.detector_path())
    out = {"detectors_on_halves": detector_on_halves(det)}
    for unet in ("one-object", "two-objects"):
        out[f"base_sanity, {unet} unet"] = base_sanity(default_judge(2, unet), prompts, seed)
    return out


def lora_alone(judge: Judge | None = None, prompts: int = 4, seed: int = 0) -> dict:
    """Each LoRA alone, its concept named on one side (both for backgrounds): rendered there? bleeding?"""
    judge = judge or default_judge()
    rng = np.random.default_rng([seed, 4])
    out = {}
    for spec in LORAS:
        if spec.category == "style":
            continue
        sides = ("both",) if spec.category == "background" else SIDES
        t = Tally()
        for side in sides:
            for i in range(prompts):
                combo = ((side, spec),)
                judge.run(t, pair_for(combo, rng), combo, "merge", seed + 100 + i)
        s = t.summary()
        out[spec.name] = {
            "on_its_half": s["concepts"][spec.value],
            "bleeding": s["bleed"].get(spec.value),
            "images": s["images"],
            "base_confidence": s["base_confidence"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.miniworld.two_object_checks", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["check", "alone"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = checks(seed=args.seed) if args.what == "check" else lora_alone(seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
