"""The two-object mini world: 128x64 pictures, one object per half, sharing background and style.

Each 64x64 half is a one-object picture of :mod:`~lora_composer.miniworld.world`, so the shipped detectors
judge each half by cropping. Concepts named for one object must stay on it: a concept found on the other
half is *bleeding*, the classic multi-subject failure, and it counts against a composition.

``compose eval --world two-objects`` measures the strategies here; the base's fine-tune and the checks
docs/EVAL.md quotes are development tools of a source checkout (``bench/miniworld/train_two_objects.py``,
``bench/miniworld/two_object_checks.py``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lora_composer.miniworld import assets, world
from lora_composer.miniworld.text_layers import TEXT_LAYERS, apply_text_layers

WIDTH, HEIGHT = 2 * world.SIZE, world.SIZE
SIDES = ("left", "right")
OBJECT_CATEGORIES = ("shape", "colour", "character")  # drawn per object; background and style are shared
SHARED_CATEGORIES = ("background", "style")


@dataclass(frozen=True)
class Pair:
    """Two one-object scenes with the same background and style."""

    left: world.Scene
    right: world.Scene

    def __post_init__(self):
        for cat in SHARED_CATEGORIES:
            if getattr(self.left, cat) != getattr(self.right, cat):
                raise ValueError(
                    f"both objects share the {cat}: {getattr(self.left, cat)!r} vs {getattr(self.right, cat)!r}"
                )

    def side(self, name: str) -> world.Scene:
        return self.left if name == "left" else self.right


def random_pair(rng: np.random.Generator, allowed: dict[str, tuple[str, ...]] | None = None) -> Pair:
    """Object categories drawn per side, shared ones once (default: base values only)."""
    left = world.random_scene(rng, allowed)
    right = world.random_scene(rng, allowed)
    return Pair(left, replace(right, **{c: getattr(left, c) for c in SHARED_CATEGORIES}))


def caption(pair: Pair, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """``"a red circle on the left and blinky, a blue square on the right, on a striped background"``.

    The left object is always named first. With ``rng`` and ``drop`` > 0 each phrase but the shapes is
    left out with probability ``drop`` (per object for colour and character).
    """

    def said(_category: str) -> bool:
        return rng is None or drop <= 0 or rng.random() >= drop

    text = (
        f"{world.object_phrase(pair.left, said)} on the left and {world.object_phrase(pair.right, said)} on the right"
    )
    if said("background"):
        text += f", on a {pair.left.background} background"
    if pair.left.style != "filled" and said("style"):
        text += f", {pair.left.style} style"
    return text


def regional_prompt(pair: Pair, combo=()) -> tuple[str, list]:
    """The pair as a regional prompt (``"LEFT <lora:..> BREAK RIGHT <lora:..>"``): each half described as its own
    one-object picture with the LoRAs asked of its object; the ones asked of both (backgrounds) are returned
    as the call's ``loras``."""
    tags = {s: "".join(f" <lora:{spec.name}:1>" for side, spec in combo if side == s) for s in SIDES}
    text = " BREAK ".join(world.caption(pair.side(s)) + tags[s] for s in SIDES)
    return text, [(spec.name, 1.0) for side, spec in combo if side == "both"]


def render(pair: Pair, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(64, 128, 3)``: each half drawn by the one-object world (so each is in its distribution)."""
    return np.concatenate([np.asarray(world.render(pair.left, rng)), np.asarray(world.render(pair.right, rng))], axis=1)


def sample(rng: np.random.Generator, n: int, allowed=None, drop: float = 0.0):
    """``n`` random pairs: uint8 images ``(n, 64, 128, 3)``, captions and pairs."""
    pairs = [random_pair(rng, allowed) for _ in range(n)]
    images = np.stack([render(p, rng) for p in pairs])
    return images, [caption(p, rng, drop) for p in pairs], pairs


def halves(images) -> tuple[np.ndarray, np.ndarray]:
    """Left and right 64x64 crops of 128x64 PIL images or uint8 arrays ``(n, 64, 128, 3)``."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) if isinstance(images, (list, tuple)) else images
    return np.ascontiguousarray(arr[:, :, : world.SIZE]), np.ascontiguousarray(arr[:, :, world.SIZE :])


def predict_halves(detector, images) -> tuple[dict[str, list[str]], dict[str, dict[str, torch.Tensor]]]:
    """Per side, the detected value of every category per image, and the probabilities."""
    preds, probs = {}, {}
    for side, crop in zip(SIDES, halves(images)):
        p = detector.probs(crop)
        probs[side] = p
        preds[side] = [
            {c.name: c.values[int(p[c.name][i].argmax())] for c in world.CATEGORIES} for i in range(len(crop))
        ]
    return preds, probs


# ---------------------------------------------------------------------------------------------- weights
def weights_dir() -> Path:
    return assets.two_objects_dir()


def load_pipeline(library=None, device: str | None = None, unet_dir: Path | None = None):
    """The shipped one-object pipeline with the two-object UNet in place of its own (fp16 file, fp32 model);
    ``unet_dir``: another UNet folder (the one-object model's, to compare)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lora_composer.pipeline import ComposerPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        assets.model_dir(), safety_checker=None, requires_safety_checker=False
    )
    pipe.unet = UNet2DConditionModel.from_pretrained(unet_dir or weights_dir() / "unet", torch_dtype=torch.float32)
    pipe.register_modules(unet=pipe.unet)
    if unet_dir is None:
        apply_text_layers(pipe.text_encoder, weights_dir() / TEXT_LAYERS)
    pipe.set_progress_bar_config(disable=True)
    if device:
        pipe.to(device)
    return ComposerPipeline(pipe, library=library, model=str(assets.model_dir()))


# ------------------------------------------------------------------------------------------------ scoring
def lora_specs(categories) -> list:
    from lora_composer.miniworld.library import LORAS

    return [s for s in LORAS if s.category in categories]


def combinations() -> dict[str, list[tuple]]:
    """``{kind: [((side, spec), ...)]}``: ``"2+1"`` two object LoRAs on one side and one on the other,
    ``"1+1+bg"`` one object LoRA per side and a background LoRA (``side`` is ``"both"``)."""
    objects, backgrounds = lora_specs(OBJECT_CATEGORIES), lora_specs(("background",))
    out: dict[str, list[tuple]] = {"2+1": [], "1+1+bg": []}
    for side, other in (SIDES, SIDES[::-1]):
        for a, b in itertools.combinations(objects, 2):
            if a.category != b.category:
                out["2+1"].extend(((side, a), (side, b), (other, c)) for c in objects if c not in (a, b))
    for a, b in itertools.permutations(objects, 2):
        out["1+1+bg"].extend((("left", a), ("right", b), ("both", g)) for g in backgrounds)
    return out


def pick(items: list, n: int) -> list:
    """``n`` items in a fixed shuffled order (the same for every seed, so seeds differ only in pictures)."""
    order = np.random.default_rng(2).permutation(len(items))
    return [items[int(i)] for i in order[:n]]


def pair_for(combo, rng: np.random.Generator) -> Pair:
    """The combination's concepts on their sides; base values elsewhere, the two objects' base shape and
    colour different (so a swap between the halves is visible to the detectors)."""
    shapes = rng.choice(world.CATEGORY["shape"].base, 2, replace=False)
    colours = rng.choice(world.CATEGORY["colour"].base, 2, replace=False)
    background = str(rng.choice(world.CATEGORY["background"].base))
    fields = {
        side: {"shape": str(shapes[i]), "colour": str(colours[i]), "background": background}
        for i, side in enumerate(SIDES)
    }
    for side, spec in combo:
        for s in SIDES if side == "both" else (side,):
            fields[s][spec.category] = spec.value
    return Pair(world.Scene(**fields["left"]), world.Scene(**fields["right"]))


def wanted_of(combo) -> dict[str, dict[str, str]]:
    """Per side, the LoRA concepts that half must show."""
    out: dict[str, dict[str, str]] = {s: {} for s in SIDES}
    for side, spec in combo:
        for s in SIDES if side == "both" else (side,):
            out[s][spec.category] = spec.value
    return out


def score(wanted: dict[str, dict[str, str]], pred: dict[str, dict[str, str]]) -> dict:
    """One image: the concepts hit on their own half, the object concepts found on the other half.

    A concept bleeds when it was asked of one object only (a shape, colour or character) and the detectors
    find it on the other half; ``ok`` needs every concept on its half and no bleeding.
    """
    hits = {(s, c, v): pred[s][c] == v for s in SIDES for c, v in wanted[s].items()}
    bleeds = {}
    for s, other in (SIDES, SIDES[::-1]):
        for c, v in wanted[s].items():
            if c in OBJECT_CATEGORIES and wanted[other].get(c) != v:
                bleeds[(s, c, v)] = pred[other][c] == v
    return {
        "hits": hits,
        "bleeds": bleeds,
        "ok": all(hits.values()) and not any(bleeds.values()),
        "bled": any(bleeds.values()),
    }


@dataclass
class Tally:
    """Counts of one strategy (or one check) on two-object pictures."""

    images: int = 0
    ok: int = 0
    bled: int = 0
    by_kind: dict = None
    concept: dict = None  # value -> [hits, asked]
    bleed: dict = None  # value -> [bled, asked of one object]
    base_conf: list = None
    seconds: float = 0.0
    rows: int = 0

    def __post_init__(self):
        self.by_kind, self.concept, self.bleed, self.base_conf = {}, {}, {}, []

    def add(self, result: dict, kind: str = "", base_conf=()) -> None:
        self.images += 1
        self.ok += result["ok"]
        self.bled += result["bled"]
        k = self.by_kind.setdefault(kind, [0, 0])
        k[0] += result["ok"]
        k[1] += 1
        for (_, _, v), h in result["hits"].items():
            rec = self.concept.setdefault(v, [0, 0])
            rec[0] += h
            rec[1] += 1
        for (_, _, v), b in result["bleeds"].items():
            rec = self.bleed.setdefault(v, [0, 0])
            rec[0] += b
            rec[1] += 1
        self.base_conf.extend(base_conf)

    def summary(self) -> dict:
        rate = lambda h, n: round(h / n, 4) if n else None  # noqa: E731
        return {
            "images": self.images,
            "all_concepts": rate(self.ok, self.images),
            "bleeding": rate(self.bled, self.images),
            "by_kind": {k: rate(*v) for k, v in self.by_kind.items()},
            "per_concept": round(float(np.mean([h / n for h, n in self.concept.values()])), 4)
            if self.concept
            else None,
            "concepts": {v: rate(*hn) for v, hn in sorted(self.concept.items())},
            "bleed": {v: rate(*bn) for v, bn in sorted(self.bleed.items())},
            "base_confidence": round(float(np.mean(self.base_conf)), 4) if self.base_conf else None,
            "images_per_s": round(self.images / self.seconds, 2) if self.seconds else None,
            "rows_per_image": round(self.rows / self.images, 2) if self.rows and self.images else None,
        }


def base_named(pair: Pair, combo=()) -> dict[str, dict[str, str]]:
    """Per side, the base-model values the caption names (those no LoRA of ``combo`` supplies)."""
    given = wanted_of(combo)
    return {
        s: {c: getattr(pair.side(s), c) for c in ("shape", "colour", "background") if c not in given[s]} for s in SIDES
    }


class Judge:
    """Renders 128x64 pictures with a ComposerPipeline and scores each half with the detectors."""

    def __init__(
        self, pipe, detector, steps: int = 20, guidance: float = assets.DEFAULT_GUIDANCE, seeds: int = 1, base: str = ""
    ):
        self.pipe, self.detector, self.steps, self.guidance, self.seeds = pipe, detector, steps, guidance, seeds
        self.base = base  # which base model renders (recorded with the results)
        self.auto = False  # True: every render picks its LoRAs with loras="auto" (regional: per region)

    def render(self, prompt: str, loras, strategy: str, seed: int):
        from lora_composer.fusion.registry import parse_strategy_args

        name, _, args = strategy.partition(":")
        return self.pipe(
            prompt,
            loras=loras,
            strategy=name,
            strategy_args=parse_strategy_args(args),
            seed=seed,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            height=HEIGHT,
            width=WIDTH,
            num_images_per_prompt=self.seeds,
            progress=False,
        )

    def run(self, tally: Tally, pair: Pair, combo, strategy: str, seed: int, kind: str = ""):
        t0 = time.perf_counter()
        regional = strategy.partition(":")[0] == "regional"
        if self.auto:  # the words alone: the retriever finds the LoRAs (for regional, each region's own)
            images = self.render(regional_prompt(pair)[0] if regional else caption(pair), "auto", strategy, seed)
        elif regional:
            images = self.render(*regional_prompt(pair, combo), strategy, seed)
        else:
            images = self.render(caption(pair), [(spec.name, 1.0) for _, spec in combo], strategy, seed)
        tally.seconds += time.perf_counter() - t0
        tally.rows += int(getattr(getattr(self.pipe, "last_driver", None), "rows", 0) or 0)
        preds, probs = predict_halves(self.detector, images)
        wanted, base = wanted_of(combo), base_named(pair, combo)
        for i in range(len(images)):
            pred = {s: preds[s][i] for s in SIDES}
            conf = [float(probs[s][c][i, world.CATEGORY[c].values.index(v)]) for s in SIDES for c, v in base[s].items()]
            tally.add(score(wanted, pred), kind, conf)
        return images


# ----------------------------------------------------------------------------------------------- checks
def detector_on_halves(detector, n: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-side, per-category accuracy on freshly drawn two-object pictures of every value."""
    rng = np.random.default_rng([seed, 2])
    everything = {c.name: c.values for c in world.CATEGORIES}
    images, _, pairs = sample(rng, n, everything)
    preds, _ = predict_halves(detector, images)
    return {
        s: {
            c.name: round(
                float(np.mean([preds[s][i][c.name] == getattr(p.side(s), c.name) for i, p in enumerate(pairs)])), 4
            )
            for c in world.CATEGORIES
        }
        for s in SIDES
    }


def base_sanity(judge: Judge, prompts: int = 24, seed: int = 0, strategy: str = "merge") -> dict:
    """No LoRA: does each half show the base concepts named for it (shape, colour, background, character)?
    ``strategy="regional"``: each half described in its own region (:func:`regional_prompt`)."""
    rng = np.random.default_rng([seed, 3])
    ok, per, swaps, n = 0, {}, 0, 0
    for i in range(prompts):
        pair = pair_for((), rng)
        chars = rng.choice(world.CATEGORY["character"].base, 2)
        pair = Pair(replace(pair.left, character=str(chars[0])), replace(pair.right, character=str(chars[1])))
        prompt = regional_prompt(pair)[0] if strategy.partition(":")[0] == "regional" else caption(pair)
        images = judge.render(prompt, [], strategy, seed + i)
        preds, _ = predict_halves(judge.detector, images)
        for j in range(len(images)):
            n += 1
            good = True
            for s, other in (SIDES, SIDES[::-1]):
                for c in ("shape", "colour", "background", "character"):
                    hit = preds[s][j][c] == getattr(pair.side(s), c)
                    rec = per.setdefault(c, [0, 0])
                    rec[0] += hit
                    rec[1] += 1
                    good &= hit
                swaps += (
                    preds[s][j]["shape"] == pair.side(other).shape and preds[s][j]["colour"] == pair.side(other).colour
                )
        ok += good
    return {
        "images": n,
        "all_named_on_their_half": round(ok / n, 4),
        "per_category": {c: round(h / t, 4) for c, (h, t) in per.items()},
        "halves_showing_the_other_object": round(swaps / (2 * n), 4),
    }


def default_judge(seeds: int = 1, unet: str = "two-objects") -> Judge:
    """``unet``: ``"two-objects"`` (the base fine-tuned here) or ``"one-object"`` (the LoRAs' own base)."""
    from lora_composer.miniworld.detectors import load_detector

    pipe = load_pipeline(assets.library_dir(), unet_dir=assets.model_dir() / "unet" if unet == "one-object" else None)
    return Judge(pipe, load_detector(assets.detector_path()), seeds=seeds, base=unet)


# ------------------------------------------------------------------------------------------------- eval
def _example(combo) -> str:
    """What a combination asks of each half, for the example grid (``"left: purple, star / right: blinky"``)."""
    wanted = wanted_of(combo)
    return " / ".join(f"{s}: {', '.join(wanted[s].values()) or 'base'}" for s in SIDES)


def evaluate(
    judge: Judge,
    strategies,
    per_kind: int = 4,
    seed: int = 0,
    checks_too: bool = False,
    progress: bool = True,
    grid_path: Path | None = None,
) -> dict:
    """Every strategy on ``per_kind`` combinations of each kind (spread over :func:`combinations`), the same
    pictures and seeds for each; ``judge.seeds`` images per combination. ``grid_path``: also an example grid
    (strategies by rows, up to 6 combinations of both kinds by columns)."""
    from tqdm.auto import tqdm

    from lora_composer.miniworld.evaluate import save_grid

    combos = [(kind, c) for kind, items in combinations().items() for c in pick(items, per_kind)]
    result: dict = {
        "protocol": {
            "world": "two-objects",
            "combinations": len(combos),
            "per_kind": per_kind,
            "seeds": judge.seeds,
            "seed": seed,
            "steps": judge.steps,
            "guidance": judge.guidance,
            "size": f"{WIDTH}x{HEIGHT}",
            "strategies": list(strategies),
            "base": judge.base,
            "loras": "auto" if judge.auto else "by hand",
        }
    }
    t_start = time.perf_counter()
    if checks_too:
        regional = next((s for s in strategies if s.partition(":")[0] == "regional"), "regional")
        result["checks"] = {
            "base_sanity": base_sanity(judge, 12, seed),
            "base_sanity, regions": {**base_sanity(judge, 12, seed, regional), "strategy": regional},
        }
    bar = tqdm(total=len(combos) * len(strategies), desc="eval two-objects", unit="render", disable=not progress)
    result["strategies"] = {}
    examples = set(np.linspace(0, len(combos) - 1, min(6, len(combos))).round().astype(int).tolist())
    grid: dict[str, list] = {}
    for name in strategies:
        tally = Tally()
        rng = np.random.default_rng([seed, 5])
        for i, (kind, combo) in enumerate(combos):
            images = judge.run(tally, pair_for(combo, rng), combo, name, seed + i, kind)
            if i in examples:
                grid.setdefault(name, []).append((_example(combo), images[0]))
            bar.set_postfix(strategy=name)
            bar.update()
        result["strategies"][name] = tally.summary()
    bar.close()
    if grid_path is not None and grid:
        result["grid"] = str(save_grid(grid, grid_path))
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def markdown(result: dict, command: str) -> str:
    """The two-object strategy table (bleeding-aware all-concepts rate, bleeding, per concept) as Markdown."""
    p = result["protocol"]
    kinds = sorted({k for s in result["strategies"].values() for k in s["by_kind"]})
    merge_rows = p["steps"] * (2 if p["guidance"] > 1 else 1)
    lines = [
        f"Command: `{command}`",
        "",
        f"{p['combinations']} combinations ({p['per_kind']} per kind), {p['seeds']} image(s) each, seed {p['seed']}, "
        + (f"the {p['base']} base, " if p.get("base") else "")
        + ("LoRAs chosen by loras=auto, " if p.get("loras") == "auto" else "")
        + f"{p['size']}, {p['steps']} steps, guidance {p['guidance']}; {result['seconds']:.0f} s in all.",
        "",
        "| strategy | all concepts, no bleeding | "
        + " | ".join(f"all, {k}" for k in kinds)
        + " | bleeding | per concept | base-concept confidence | rows vs merge | images/s |",
        "|---|---|" + "---|" * (len(kinds) + 5),
    ]
    for name, s in result["strategies"].items():
        rows = s.get("rows_per_image")
        lines.append(
            f"| {name} | {s['all_concepts']:.3f} | "
            + " | ".join(f"{s['by_kind'].get(k, 0):.3f}" for k in kinds)
            + f" | {s['bleeding']:.3f} | {s['per_concept']:.3f} | {s['base_confidence']:.3f} | "
            + (f"{rows / merge_rows:.2f}" if rows else "")
            + f" | {s['images_per_s']:.2f} |"
        )
    for key, how in (("base_sanity", "one caption"), ("base_sanity, regions", "one region per object")):
        b = result.get("checks", {}).get(key)
        if b:
            how += f" ({b['strategy']})" if "strategy" in b else ""
            lines += [
                "",
                f"Base check, {how} (no LoRA, {b['images']} pictures; goal >= 0.80): every named concept on "
                f"its half {b['all_named_on_their_half']:.3f}; "
                + ", ".join(f"{k} {v:.2f}" for k, v in b["per_category"].items())
                + f"; halves showing the other object {b['halves_showing_the_other_object']:.2f}",
            ]
    concepts = sorted({v for s in result["strategies"].values() for v in s["concepts"]})
    lines += [
        "",
        "Per concept, on its half (and, for object concepts, found on the other half):",
        "",
        "| strategy | " + " | ".join(concepts) + " |",
        "|---|" + "---|" * len(concepts),
    ]
    for name, s in result["strategies"].items():
        cells = []
        for v in concepts:
            hit, bled = s["concepts"].get(v), s["bleed"].get(v)
            cells.append("" if hit is None else f"{hit:.2f}" + (f" ({bled:.2f})" if bled is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
