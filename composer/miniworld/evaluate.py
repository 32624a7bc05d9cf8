"""Measure every composition strategy and the retriever on the mini world (``compose eval`` runs it).

A protocol like ComposLoRA's (Zhong et al. 2024), with the VLM judge replaced by ground truth: every
combination of 2, 3 and 4 concept LoRAs from different categories is rendered with every strategy, and the
mini world's detectors say which concepts each image shows. Reported per strategy: the rate of images
where every requested concept is detected (overall and per combination size), the per-concept rate, a
quality proxy (the detectors' confidence in the prompt's base-model concepts), and images/s.
Also: the sanity checks the mini world must pass (the base model renders its own concepts and not the
LoRAs'; each LoRA alone renders its concept) and the retriever's recall@k on prompts naming the concepts.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_composer.fusion.registry import parse_strategy_args
from lora_composer.miniworld import assets, world
from lora_composer.miniworld.library import LORAS, LoraSpec

BASE_CATEGORIES = ("shape", "colour", "background")  # the categories whose base values a prompt names


def combinations(sizes=(2, 3, 4)) -> list[tuple[LoraSpec, ...]]:
    """Every set of LoRAs, one per category, of each size in ``sizes`` (ComposLoRA's rule)."""
    by_cat: dict[str, list[LoraSpec]] = {}
    for spec in LORAS:
        by_cat.setdefault(spec.category, []).append(spec)
    out = []
    for k in sizes:
        for cats in itertools.combinations(list(by_cat), k):
            out.extend(itertools.product(*(by_cat[c] for c in cats)))
    return out


def draw(combos: list[tuple], per_size: int | None, seed: int = 0) -> list[tuple]:
    """``per_size`` combinations of each size drawn from ``combos`` (seeded by ``seed``, so every strategy of a run
    and every run with that seed gets the same ones), in their original order; ``None``: all of them. Lets a costly
    strategy (a fitted one) be measured on a sample the cheap ones are measured on too."""
    if per_size is None:
        return list(combos)
    if per_size < 1:
        raise ValueError(f"combinations per size must be at least 1, got {per_size}")
    rng = np.random.default_rng([seed, 0xC0B05])
    by_size: dict[int, list[int]] = {}
    for i, combo in enumerate(combos):
        by_size.setdefault(len(combo), []).append(i)
    keep: set[int] = set()
    for indices in by_size.values():
        keep.update(int(i) for i in rng.choice(indices, size=min(per_size, len(indices)), replace=False))
    return [combo for i, combo in enumerate(combos) if i in keep]


def scene_for(combo, rng: np.random.Generator) -> world.Scene:
    """The LoRAs' concepts, base values drawn for the other shape/colour/background, plain style."""
    fields = {c.name: c.base[0] for c in world.CATEGORIES}
    for cat in BASE_CATEGORIES:
        fields[cat] = str(rng.choice(world.CATEGORY[cat].base))
    for spec in combo:
        fields[spec.category] = spec.value
    return world.Scene(**fields)


@dataclass
class Tally:
    """Detection counts of one strategy (or one check)."""

    images: int = 0
    all_hit: int = 0
    by_size: dict[int, list[int]] = field(default_factory=dict)  # size -> [all_hit, images]
    concept: dict[str, list[int]] = field(default_factory=dict)  # value -> [hits, images]
    base_conf: list[float] = field(default_factory=list)
    seconds: float = 0.0
    rows: int = 0  # denoiser rows computed (every row group, both halves of guidance), all images

    def add(self, wanted: dict[str, str], base: dict[str, str], pred: dict[str, str], probs: dict[str, float]) -> None:
        hits = [pred[c] == v for c, v in wanted.items()]
        self.images += 1
        self.all_hit += all(hits)
        size = self.by_size.setdefault(len(wanted), [0, 0])
        size[0] += all(hits)
        size[1] += 1
        for (c, v), h in zip(wanted.items(), hits):
            rec = self.concept.setdefault(v, [0, 0])
            rec[0] += h
            rec[1] += 1
        self.base_conf.extend(probs[c] for c in base)

    def summary(self) -> dict:
        rate = lambda h, n: round(h / n, 4) if n else None  # noqa: E731
        return {
            "images": self.images,
            "all_concepts": rate(self.all_hit, self.images),
            "by_size": {k: rate(*v) for k, v in sorted(self.by_size.items())},
            "per_concept": round(float(np.mean([h / n for h, n in self.concept.values()])), 4)
            if self.concept
            else None,
            "concepts": {v: rate(*hn) for v, hn in sorted(self.concept.items())},
            "base_confidence": round(float(np.mean(self.base_conf)), 4) if self.base_conf else None,
            "images_per_s": round(self.images / self.seconds, 2) if self.seconds else None,
            "rows_per_image": round(self.rows / self.images, 2) if self.rows and self.images else None,
        }


class Evaluator:
    """Renders with one :class:`~lora_composer.pipeline.ComposerPipeline` and judges with the detectors."""

    def __init__(self, pipe, detector, steps: int = 20, guidance: float = assets.DEFAULT_GUIDANCE, seeds: int = 2):
        self.pipe, self.detector = pipe, detector
        self.steps, self.guidance, self.seeds = steps, guidance, seeds

    def render(self, prompt: str, loras, strategy: str, seed: int):
        """``strategy``: a name, or ``NAME:ARGS`` with the arguments as ``--strategy-arg`` reads them
        (``"marginal:scale=0.5 until=0.3"``), so variants of one strategy are measured side by side."""
        name, _, args = strategy.partition(":") if isinstance(strategy, str) else (strategy, "", "")
        return self.pipe(
            prompt,
            loras=loras,
            strategy=name,
            strategy_args=parse_strategy_args(args),
            seed=seed,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            num_images_per_prompt=self.seeds,
            progress=False,
        )

    def judge(self, tally: Tally, images, wanted: dict[str, str], base: dict[str, str]) -> None:
        probs = self.detector.probs(images)
        order = {c.name: list(c.values) for c in getattr(self.detector, "categories", world.CATEGORIES)}
        for i in range(len(images)):
            pred = {c: order[c][int(p[i].argmax())] for c, p in probs.items()}
            conf = {c: float(probs[c][i, order[c].index(v)]) for c, v in base.items()}
            tally.add(wanted, base, pred, conf)

    def run(self, prompt, loras, strategy, seed, tally, wanted, base):
        t0 = time.perf_counter()
        images = self.render(prompt, loras, strategy, seed)
        tally.seconds += time.perf_counter() - t0
        tally.rows += int(getattr(getattr(self.pipe, "last_driver", None), "rows", 0) or 0)
        self.judge(tally, images, wanted, base)
        return images


def sanity_checks(ev: Evaluator, base_prompts: int = 24, lora_prompts: int = 8, seed: int = 0, progress=None) -> dict:
    """The mini world's own contract: what the base model and each LoRA alone render (``ev.seeds`` images
    per prompt)."""
    rng = np.random.default_rng(seed)
    base_tally = Tally()
    for i in range(base_prompts):
        scene = world.random_scene(rng)
        base = {c: getattr(scene, c) for c in BASE_CATEGORIES}
        ev.run(world.caption(scene), [], "merge", seed + i, base_tally, base, base)
        progress and progress()
    novel, alone = {}, {}
    for spec in LORAS:
        t_base, t_lora = Tally(), Tally()
        for i in range(lora_prompts):
            prompt = world.caption(scene_for((spec,), rng))
            ev.run(prompt, [], "merge", seed + 100 + i, t_base, {spec.category: spec.value}, {})
            ev.run(prompt, [(spec.name, 1.0)], "merge", seed + 100 + i, t_lora, {spec.category: spec.value}, {})
        novel[spec.name] = t_base.summary()["all_concepts"]
        alone[spec.name] = t_lora.summary()["all_concepts"]
        progress and progress()
    return {
        "images_per_prompt": ev.seeds,
        "base_prompts": base_prompts,
        "lora_prompts": lora_prompts,
        "base_on_base": base_tally.summary(),
        "base_on_lora_concepts": novel,
        "lora_alone": alone,
    }


# -- retrieval: labelled prompt sets --------------------------------------------------------------------
# Other phrasings of each LoRA concept: (tuning, held out). Thresholds are fitted on the tuning phrasings
# and seed only; the held-out phrasings and seed report the result. OOV: synonyms that neither the library's
# metadata nor the mini world's text encoder (trained on world captions only) can know, reported apart.
PARAPHRASES = {
    ("shape", "star"): (("a star shape", "some stars"), ("a five-pointed star", "a star-shaped object")),
    ("shape", "cross"): (("a plus sign", "some crosses"), ("a plus-shaped mark", "a cross shape")),
    ("colour", "purple"): (("coloured purple", "purple-ish"), ("in a purple hue", "purplish")),
    ("colour", "orange"): (("coloured orange", "orange-hued"), ("in an orange tint", "orangey")),
    ("background", "checkered"): (
        ("on a checkered pattern", "with a checkerboard background"),
        ("over a checkerboard backdrop", "on a background of checkers"),
    ),
    ("background", "wavy"): (
        ("on wavy lines", "with a wavy backdrop"),
        ("over a background of wavy lines", "on a wavy-lined background"),
    ),
    ("style", "outline"): (("outlined", "drawn as an outline"), ("as a hollow outline", "in outline style")),
    ("style", "pixel"): (("pixelated", "as pixel art"), ("in the style of pixel art", "with a blocky pixel look")),
    ("character", "blinky"): (
        ("featuring blinky", "blinky the character"),
        ("with blinky on it", "blinky, the one-eyed character"),
    ),
}
OOV = {
    ("shape", "star"): "a pentagram",
    ("shape", "cross"): "an X mark",
    ("colour", "purple"): "in violet",
    ("colour", "orange"): "tangerine-coloured",
    ("background", "checkered"): "on a chessboard",
    ("background", "wavy"): "on rippled waves",
    ("style", "outline"): "as a contour drawing",
    ("style", "pixel"): "in 8-bit",
    ("character", "blinky"): "with the cyclops mascot",
}
BASE_PHRASES = {  # the base values in other words: (tuning, held out)
    "background": (
        {"plain": "on a plain backdrop", "striped": "with stripes behind it", "dotted": "on dots"},
        {"plain": "against a blank background", "striped": "on a stripy backdrop", "dotted": "over a dotted pattern"},
    ),
}


def _paraphrase(scene: world.Scene, held: bool, rng: np.random.Generator, oov: bool = False) -> str:
    """The scene in other words: each LoRA concept by a paraphrase, clauses in a random order."""

    def say(cat: str) -> str | None:
        value = getattr(scene, cat)
        key = (cat, value)
        if key in PARAPHRASES:
            return OOV[key] if oov else str(rng.choice(PARAPHRASES[key][held]))
        if cat == "background":
            return BASE_PHRASES["background"][held][value]
        if cat == "character":
            return "with a smiley face" if value == "smiley" else None
        return None if cat == "style" else value

    shape, colour = say("shape"), say("colour")
    head = (
        f"{colour} {shape}"
        if colour and not colour.startswith(("coloured", "in ", "purple-", "orange-")) and " " not in shape
        else shape
    )
    rest = [say(c) for c in ("background", "style", "character")]
    if head == shape and colour:
        rest.append(colour)
    rest = [r for r in rest if r]
    rng.shuffle(rest)
    return ", ".join([head, *rest]) if rng.random() < 0.5 else ", ".join([*rest, head])


def retrieval_cases(held: bool, sizes=(1, 2, 3, 4), base: int = 60) -> dict[str, list]:
    """``{set: [(prompt, wanted concepts)]}``: base-only captions and paraphrases (nothing wanted), every
    combination of ``sizes`` LoRA concepts in the world's captions (trigger words) and in paraphrases.
    ``held``: the held-out phrasings and seed (report) or the tuning ones (fit)."""
    rng = np.random.default_rng(101 if held else 7)
    out: dict[str, list] = {"base-only captions": [], "base-only paraphrases": []}
    for _ in range(base):
        scene = world.random_scene(rng)
        out["base-only captions"].append((world.caption(scene, rng, drop=0.3), frozenset()))
        out["base-only paraphrases"].append((_paraphrase(scene, held, rng), frozenset()))
    out["concepts, trigger words"], out["concepts, paraphrases"], out["concepts, OOV synonyms"] = [], [], []
    for combo in combinations(sizes):
        scene = scene_for(combo, rng)
        wanted = frozenset((s.category, s.value) for s in combo)
        out["concepts, trigger words"].append((world.caption(scene), wanted))
        out["concepts, paraphrases"].append((_paraphrase(scene, held, rng), wanted))
        if len(combo) == 1:
            out["concepts, OOV synonyms"].append((_paraphrase(scene, held, rng, oov=True), wanted))
    return out


def synthetic_library(dest: Path, seed: int = 0) -> dict[str, tuple | None]:
    """A 60-adapter library built from the 9 shipped LoRAs: each original, two near-duplicates of it
    (weights x (1 + 1% noise), other file names and trigger words for the same concept), 12 adapters whose
    trigger differs by one word from a concept's ("checkered floor", "pixel font"), and 21 unrelated ones
    (weights of a random original, a made-up subject). Returns ``{file stem: concept or None}``."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(seed)
    src = assets.library_dir()
    dest.mkdir(parents=True, exist_ok=True)
    label: dict[str, tuple | None] = {}

    def write(stem: str, spec: LoraSpec, triggers, description: str, noise: float, concept):
        tensors = load_file(str(src / f"{spec.name}.safetensors"))
        if noise:
            g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
            tensors = {
                k: (v.float() * (1 + noise * torch.randn(v.shape, generator=g))).to(v.dtype) for k, v in tensors.items()
            }
        save_file(tensors, str(dest / f"{stem}.safetensors"), metadata={"ss_output_name": stem})
        (dest / f"{stem}.civitai.info").write_text(
            json.dumps({"trainedWords": list(triggers), "description": description})
        )
        label[stem] = concept

    for spec in LORAS:
        shutil.copy(src / f"{spec.name}.safetensors", dest / f"{spec.name}.safetensors")
        for side in (".json", ".civitai.info"):
            if (src / f"{spec.name}{side}").is_file():
                shutil.copy(src / f"{spec.name}{side}", dest / f"{spec.name}{side}")
        label[spec.name] = (spec.category, spec.value)
        key = (spec.category, spec.value)
        write(f"{spec.name}-v2", spec, spec.triggers, spec.description + " Retrained.", 0.01, key)
        write(
            f"{spec.value}_{spec.category}_lora",
            spec,
            (f"{spec.value} {spec.category}",),
            f"{spec.value.capitalize()} {spec.category}, second take.",
            0.01,
            key,
        )
    one_word = (
        ("checkered floor", "Checkered tiles on the floor."),
        ("wavy hair", "Long wavy hair."),
        ("pixel font", "Pixel lettering."),
        ("outline text", "Outlined lettering."),
        ("star sticker", "Glossy star stickers."),
        ("cross stitch", "Embroidery in cross stitch."),
        ("purple sky", "A purple evening sky."),
        ("orange juice", "A glass of orange juice."),
        ("blinky lights", "Blinking fairy lights."),
        ("checkered flag", "A racing flag."),
        ("wavy glass", "Distorted wavy glass."),
        ("pixel sorting", "Glitch pixel sorting."),
    )
    unrelated = (
        "watercolor",
        "neon glow",
        "film grain",
        "anime eyes",
        "castle",
        "dragon",
        "robot",
        "forest",
        "samurai",
        "owl",
        "volcano",
        "lantern",
        "cyberpunk city",
        "oil painting",
        "portrait lighting",
        "snowy village",
        "ink sketch",
        "low poly",
        "vaporwave",
        "bokeh",
        "clay render",
    )
    for i, (trig, desc) in enumerate(one_word + tuple((u, f"{u.capitalize()} LoRA.") for u in unrelated)):
        spec = LORAS[int(rng.integers(len(LORAS)))]
        write(trig.replace(" ", "-"), spec, (trig,), desc, 0.05, None)
    return label


def _measure(retriever, prepared: dict, label_of, top_k: int, thresholds: dict) -> dict:
    from lora_composer.retriever import calibration

    out = {}
    for name, cached in prepared.items():
        r = calibration.measure(retriever, cached, label_of, thresholds, top_k)
        out[name] = {"prompts": len(cached), **{k: round(v, 4) for k, v in r.items()}}
    return out


def retrieval_recall(pipe, combos, seed: int = 0) -> dict:
    """recall@k of ``--loras auto`` (top_k = k, calibrated thresholds) on the strategy table's prompts."""
    rng = np.random.default_rng(seed)
    per_size: dict[int, list[float]] = {}
    for combo in combos:
        prompt = world.caption(scene_for(combo, rng))
        found = {Path(p).stem for p, _ in pipe.choose_loras(prompt, top_k=len(combo))}
        per_size.setdefault(len(combo), []).append(len(found & {s.name for s in combo}) / len(combo))
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(per_size.items())}


def retrieval_report(
    pipe,
    library: Path | None = None,
    label: dict | None = None,
    top_k: int = 4,
    store: bool = False,
    sizes=(1, 2, 3, 4),
    base: int = 60,
) -> dict:
    """Fit the selection thresholds on the tuning set (phrasings and seed), then precision, recall and
    base-only false-positive rate per prompt set on the held-out set, with those thresholds."""
    from lora_composer.retriever import calibration, retriever_for

    library = library or assets.library_dir()
    label = label or {s.name: (s.category, s.value) for s in LORAS}
    r = retriever_for(pipe.pipe, library, family=pipe.runtime.family)
    r.refresh()
    label_of = lambda row: label.get(row.name)  # noqa: E731
    tune = {k: calibration.prepare(r, v, top_k) for k, v in retrieval_cases(False, sizes, base).items()}
    fit_cases = [c for k, v in tune.items() if "OOV" not in k for c in v]
    thresholds = calibration.fit(r, fit_cases, label_of, top_k, prepared=True)
    if store:  # the catalog keeps its calibration; --loras auto reads it
        calibration.store(r.catalog, r.encoder.id, thresholds, {"fitted_on": "mini world tuning set"})
        r._version = None
    held = {k: calibration.prepare(r, v, top_k) for k, v in retrieval_cases(True, sizes, base).items()}
    return {
        "library": str(library),
        "adapters": len(r.rows),
        "top_k": top_k,
        "thresholds": thresholds,
        "tuning": _measure(r, tune, label_of, top_k, thresholds),
        "held_out": _measure(r, held, label_of, top_k, thresholds),
        "curves": calibration.curves(
            r, [c for k, v in tune.items() if "OOV" not in k for c in v], label_of, thresholds, top_k, prepared=True
        ),
    }


def retrieval_markdown(rep: dict) -> str:
    """The held-out precision/recall/false-positive table of one :func:`retrieval_report`."""
    th = ", ".join(f"{k} {v:g}" for k, v in rep["thresholds"].items())
    lines = [
        f"Retriever, `--loras auto` (top_k {rep['top_k']}), {rep['adapters']} adapters; thresholds fitted on the "
        f"tuning set ({th}), measured on the held-out set:",
        "",
        "| prompt set | prompts | precision | recall | prompts with any pick (base-only) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rep["held_out"].items():
        fp = f"{r['fp_rate']:.3f}" if name.startswith("base") else ""
        lines.append(f"| {name} | {r['prompts']} | {r['precision']:.3f} | {r['recall']:.3f} | {fp} |")
    return "\n".join(lines)


def auto_vs_hand(
    pipe,
    detector,
    sizes=(1, 2, 3, 4),
    per_size: int = 6,
    seed: int = 2000,
    strategy: str = "merge",
    steps: int = 20,
    guidance: float = assets.DEFAULT_GUIDANCE,
    top_k: int = 4,
    progress=None,
) -> dict:
    """End to end: the all-concepts rate of ``loras="auto"`` against the hand-picked set (each LoRA at 1.0,
    as in the strategy table), same prompt, strategy, seed and detector. ``per_size`` combinations of each
    size in ``sizes`` (spread evenly over :func:`combinations`), each said two ways: the world's caption
    (trigger words) and a held-out paraphrase; one image each, so ``2 x 2 x per_size x len(sizes)`` renders.
    ``seed`` (scenes, paraphrases and renders) is not one the thresholds were fitted on (7) or reported on
    (101). Also reported: how often auto picked exactly the wanted concepts."""
    ev = Evaluator(pipe, detector, steps=steps, guidance=guidance, seeds=1)
    rng = np.random.default_rng(seed)
    label = {s.name: (s.category, s.value) for s in LORAS}
    out: dict = {
        "strategy": strategy,
        "seed": seed,
        "sizes": list(sizes),
        "per_size": per_size,
        "top_k": top_k,
        "sets": {},
    }
    for phrasing in ("trigger words", "paraphrases"):
        out["sets"][phrasing] = {"hand": Tally(), "auto": Tally(), "exact_picks": 0, "prompts": 0}
    i = 0
    for k in sizes:
        combos = combinations((k,))
        for combo in [combos[j] for j in sorted(_grid_picks(combos, per_size))]:
            scene = scene_for(combo, rng)
            wanted = {s.category: s.value for s in combo}
            base = {c: getattr(scene, c) for c in BASE_CATEGORIES if c not in wanted}
            for phrasing, prompt in (
                ("trigger words", world.caption(scene)),
                ("paraphrases", _paraphrase(scene, True, rng)),
            ):
                rec = out["sets"][phrasing]
                ev.run(prompt, [(s.name, 1.0) for s in combo], strategy, seed + i, rec["hand"], wanted, base)
                t0 = time.perf_counter()
                images = ev.pipe(
                    prompt,
                    loras="auto",
                    top_k=top_k,
                    strategy=strategy,
                    seed=seed + i,
                    num_inference_steps=ev.steps,
                    guidance_scale=ev.guidance,
                    num_images_per_prompt=1,
                    progress=False,
                )
                rec["auto"].seconds += time.perf_counter() - t0
                ev.judge(rec["auto"], images, wanted, base)
                picked = [label.get(Path(m.path).stem) for m in ev.pipe.last_retrieval]
                rec["exact_picks"] += sorted(map(str, picked)) == sorted(str((s.category, s.value)) for s in combo)
                rec["prompts"] += 1
                progress and progress(2)
            i += 1
    for phrasing, rec in out["sets"].items():
        rec["hand"], rec["auto"] = rec["hand"].summary(), rec["auto"].summary()
        rec["gap"] = round(rec["hand"]["all_concepts"] - rec["auto"]["all_concepts"], 4)
    return out


def auto_markdown(rep: dict) -> str:
    """The end-to-end table of :func:`auto_vs_hand`."""
    sizes = rep["sizes"]
    lines = [
        f"End to end, `--loras auto` (top_k {rep['top_k']}) vs the hand-picked set, strategy {rep['strategy']}: "
        f"{rep['per_size']} combinations per size ({', '.join(map(str, sizes))}), seed {rep['seed']}, one image "
        "per prompt; all-concepts rate (goal: auto within 3 points of hand-picked):",
        "",
        "| prompts | n | hand-picked | --loras auto | gap (points) | "
        + " | ".join(f"auto, {k} LoRAs" for k in sizes)
        + " | auto picked exactly the wanted set |",
        "|---|---|---|---|---|" + "---|" * len(sizes) + "---|",
    ]
    for phrasing, rec in rep["sets"].items():
        by = rec["auto"]["by_size"]
        lines.append(
            f"| {phrasing} | {rec['prompts']} | {rec['hand']['all_concepts']:.3f} | "
            f"{rec['auto']['all_concepts']:.3f} | {100 * rec['gap']:+.1f} | "
            + " | ".join(f"{by.get(k, by.get(str(k))):.3f}" for k in sizes)
            + f" | {rec['exact_picks']}/{rec['prompts']} |"
        )
    return "\n".join(lines)


def evaluate(
    pipe,
    detector,
    strategies,
    sizes=(2, 3, 4),
    seeds: int = 2,
    steps: int = 20,
    guidance: float = assets.DEFAULT_GUIDANCE,
    seed: int = 0,
    grid_path: Path | None = None,
    checks: bool = True,
    retrieval: bool = True,
    progress: bool = True,
    auto_per_size: int = 0,
    per_size: int | None = None,
) -> dict:
    """The strategy table (and the checks, the retriever's figures); ``auto_per_size`` > 0 adds
    :func:`auto_vs_hand` with that many combinations per size 1-4 (``2 x 2 x 4 x auto_per_size`` renders);
    ``per_size``: that many combinations of each size (:func:`draw`), else all."""
    from tqdm.auto import tqdm

    combos = draw(combinations(sizes), per_size, seed)
    ev = Evaluator(pipe, detector, steps=steps, guidance=guidance, seeds=seeds)
    auto_per_size = auto_per_size if retrieval and pipe.library is not None else 0
    total = len(combos) * len(strategies) + (24 + len(LORAS) if checks else 0) + 16 * auto_per_size
    bar = tqdm(total=total, desc="eval", unit="render", disable=not progress, dynamic_ncols=True)
    result: dict = {
        "protocol": {
            "sizes": list(sizes),
            "combinations": len(combos),
            "per_size": per_size,
            "seed": seed,
            "seeds": seeds,
            "steps": steps,
            "guidance": guidance,
            "strategies": list(strategies),
        }
    }
    t_start = time.perf_counter()
    if checks:
        result["checks"] = sanity_checks(ev, seed=seed, progress=bar.update)
    grid_examples = _grid_picks(combos)
    grid: dict[str, list] = {}
    result["strategies"] = {}
    for name in strategies:
        tally = Tally()
        rng = np.random.default_rng(seed)  # the same prompts and seeds for every strategy
        for i, combo in enumerate(combos):
            scene = scene_for(combo, rng)
            wanted = {s.category: s.value for s in combo}
            base = {c: getattr(scene, c) for c in BASE_CATEGORIES if c not in wanted}
            images = ev.run(world.caption(scene), [(s.name, 1.0) for s in combo], name, seed + i, tally, wanted, base)
            if i in grid_examples:
                grid.setdefault(name, []).append((world.caption(scene), images[0]))
            bar.set_postfix(strategy=name)
            bar.update()
        result["strategies"][name] = tally.summary()
    bar.close()
    if retrieval and pipe.library is not None:
        result["retrieval_recall_at_k"] = retrieval_recall(pipe, combos, seed=seed)
        result["retrieval"] = retrieval_report(pipe, sizes=(1, *sizes), base=60 if len(combos) > 50 else 10)
        if auto_per_size:
            result["auto_vs_hand"] = auto_vs_hand(
                pipe, detector, per_size=auto_per_size, steps=steps, guidance=guidance, progress=bar.update
            )
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if grid_path is not None and grid:
        save_grid(grid, grid_path)
        result["grid"] = str(grid_path)
    return result


def _grid_picks(combos, n: int = 8) -> set[int]:
    """Indices of ``n`` combinations spread evenly over the list (every size, many concepts), for the grid."""
    return {int(round((j + 0.5) * len(combos) / n)) for j in range(min(n, len(combos)))}


def save_grid(grid: dict[str, list], path: Path, scale: int = 2) -> Path:
    """Rows: strategies; columns: the example combinations (their prompts written above); cells at the
    pictures' own size times ``scale``."""
    from PIL import Image, ImageDraw

    names = list(grid)
    cols = max(len(v) for v in grid.values())
    first = grid[names[0]][0][1]
    cell_w, cell_h, label_w, head_h = first.width * scale, first.height * scale, 90, 60
    out = Image.new("RGB", (label_w + cols * cell_w, head_h + len(names) * cell_h), "white")
    draw = ImageDraw.Draw(out)
    for j, (prompt, _) in enumerate(grid[names[0]]):
        for k, line in enumerate(_wrap(prompt, 22 * cell_w // (world.SIZE * scale))[:5]):
            draw.text((label_w + j * cell_w + 2, 2 + 11 * k), line, fill="black")
    for i, name in enumerate(names):
        draw.text((4, head_h + i * cell_h + cell_h // 2 - 6), name, fill="black")
        for j, (_, img) in enumerate(grid[name]):
            out.paste(img.resize((cell_w, cell_h), Image.NEAREST), (label_w + j * cell_w, head_h + i * cell_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def strategy_tables(result: dict, concepts: list[str]) -> list[str]:
    """Markdown lines: the strategy table (all concepts, per size, per concept, base-concept confidence, denoiser
    rows per image over merge's, speed), then the per-concept table over ``concepts`` (left out when empty)."""
    p = result["protocol"]
    sizes = p["sizes"]
    lines = [
        "| strategy | all concepts | "
        + " | ".join(f"all, {k} LoRAs" for k in sizes)
        + " | per concept | base-concept confidence | rows vs merge | images/s |",
        "|---|" + "---|" * (len(sizes) + 5),
    ]
    merge_rows = p["steps"] * (2 if p["guidance"] > 1 else 1)  # one pass per step, both halves of guidance
    for name, s in result["strategies"].items():
        by = s["by_size"]
        rows = s.get("rows_per_image")
        lines.append(
            f"| {name} | {s['all_concepts']:.3f} | "
            + " | ".join(f"{by.get(k, by.get(str(k))):.3f}" for k in sizes)
            + f" | {s['per_concept']:.3f} | {s['base_confidence']:.3f} | "
            + (f"{rows / merge_rows:.2f}" if rows else "")
            + f" | {s['images_per_s']:.1f} |"
        )
    if concepts:
        lines += [
            "",
            "Per concept (share of the images asking for it that show it):",
            "",
            "| strategy | " + " | ".join(concepts) + " |",
            "|---|" + "---|" * len(concepts),
        ]
        for name, s in result["strategies"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{s['concepts'][v]:.2f}" if s["concepts"].get(v) is not None else "" for v in concepts)
                + " |"
            )
    return lines


def markdown(result: dict, command: str) -> str:
    """The strategy table, the per-size breakdown, the checks and retrieval, as Markdown."""
    p = result["protocol"]
    sizes = p["sizes"]
    lines = [
        f"Command: `{command}`",
        "",
        f"{p['combinations']} combinations (sizes {', '.join(map(str, sizes))}"
        + (f"; {p['per_size']} drawn per size, seed {p['seed']}" if p.get("per_size") else "")
        + f"), {p['seeds']} seeds each, "
        f"{p['steps']} steps, guidance {p['guidance']}; {result['seconds']:.0f} s in all.",
        "",
        *strategy_tables(result, sorted({v for s in result["strategies"].values() for v in s["concepts"]})),
    ]
    if "checks" in result:
        c = result["checks"]
        b = c["base_on_base"]
        lines += [
            "",
            f"Mini-world checks ({c['base_prompts']} base prompts, {c['lora_prompts']} prompts per LoRA, "
            f"{c['images_per_prompt']} images each; goal: base >= 0.80 on its own concepts, < 0.10 on LoRA "
            "concepts; each LoRA alone >= 0.80):",
            "",
            f"- base model, base prompts: every named concept {b['all_concepts']:.3f}, per concept "
            + ", ".join(f"{k} {v:.2f}" for k, v in b["concepts"].items()),
            "",
            "| LoRA | concept | base model alone | LoRA alone |",
            "|---|---|---|---|",
        ]
        for spec in LORAS:
            lines.append(
                f"| {spec.name} | {spec.category}={spec.value} | {c['base_on_lora_concepts'][spec.name]:.2f} | "
                f"{c['lora_alone'][spec.name]:.2f} |"
            )
    if "retrieval" in result:
        lines += ["", retrieval_markdown(result["retrieval"])]
    if "auto_vs_hand" in result:
        lines += ["", auto_markdown(result["auto_vs_hand"])]
    return "\n".join(lines) + "\n"
