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
            "per_concept": round(float(np.mean([h / n for h, n in self.concept.values()])), 4) if self.concept else None,
            "concepts": {v: rate(*hn) for v, hn in sorted(self.concept.items())},
            "base_confidence": round(float(np.mean(self.base_conf)), 4) if self.base_conf else None,
            "images_per_s": round(self.images / self.seconds, 2) if self.seconds else None,
        }


class Evaluator:
    """Renders with one :class:`~lora_composer.pipeline.ComposerPipeline` and judges with the detectors."""

    def __init__(self, pipe, detector, steps: int = 20, guidance: float = assets.DEFAULT_GUIDANCE, seeds: int = 2):
        self.pipe, self.detector = pipe, detector
        self.steps, self.guidance, self.seeds = steps, guidance, seeds

    def render(self, prompt: str, loras, strategy: str, seed: int):
        return self.pipe(prompt, loras=loras, strategy=strategy, seed=seed, num_inference_steps=self.steps,
                         guidance_scale=self.guidance, num_images_per_prompt=self.seeds, progress=False)

    def judge(self, tally: Tally, images, wanted: dict[str, str], base: dict[str, str]) -> None:
        probs = self.detector.probs(images)
        order = {c.name: list(c.values) for c in world.CATEGORIES}
        for i in range(len(images)):
            pred = {c: order[c][int(p[i].argmax())] for c, p in probs.items()}
            conf = {c: float(probs[c][i, order[c].index(v)]) for c, v in base.items()}
            tally.add(wanted, base, pred, conf)

    def run(self, prompt, loras, strategy, seed, tally, wanted, base):
        t0 = time.perf_counter()
        images = self.render(prompt, loras, strategy, seed)
        tally.seconds += time.perf_counter() - t0
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
    return {"images_per_prompt": ev.seeds, "base_prompts": base_prompts, "lora_prompts": lora_prompts,
            "base_on_base": base_tally.summary(), "base_on_lora_concepts": novel, "lora_alone": alone}


def retrieval_recall(pipe, combos, seed: int = 0) -> dict:
    """recall@k of ``--loras auto`` (top_k = k, no score floor) on prompts naming each combination's concepts."""
    rng = np.random.default_rng(seed)
    per_size: dict[int, list[float]] = {}
    for combo in combos:
        prompt = world.caption(scene_for(combo, rng))
        found = {Path(p).stem for p, _ in pipe.choose_loras(prompt, top_k=len(combo), min_score=0.0)}
        per_size.setdefault(len(combo), []).append(len(found & {s.name for s in combo}) / len(combo))
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(per_size.items())}


def evaluate(pipe, detector, strategies, sizes=(2, 3, 4), seeds: int = 2, steps: int = 20,
             guidance: float = assets.DEFAULT_GUIDANCE, seed: int = 0, grid_path: Path | None = None, checks: bool = True, retrieval: bool = True,
             progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    combos = combinations(sizes)
    ev = Evaluator(pipe, detector, steps=steps, guidance=guidance, seeds=seeds)
    total = len(combos) * len(strategies) + (24 + len(LORAS) if checks else 0)
    bar = tqdm(total=total, desc="eval", unit="render", disable=not progress, dynamic_ncols=True)
    result: dict = {"protocol": {"sizes": list(sizes), "combinations": len(combos), "seeds": seeds, "steps": steps,
                                 "guidance": guidance, "strategies": list(strategies)}}
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
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if grid_path is not None and grid:
        save_grid(grid, grid_path)
        result["grid"] = str(grid_path)
    return result


def _grid_picks(combos, n: int = 8) -> set[int]:
    """Indices of ``n`` combinations spread evenly over the list (every size, many concepts), for the grid."""
    return {int(round((j + 0.5) * len(combos) / n)) for j in range(min(n, len(combos)))}


def save_grid(grid: dict[str, list], path: Path, scale: int = 2) -> Path:
    """Rows: strategies; columns: the example combinations (their prompts written above)."""
    from PIL import Image, ImageDraw

    names = list(grid)
    cols = max(len(v) for v in grid.values())
    cell, label_w, head_h = world.SIZE * scale, 90, 60
    out = Image.new("RGB", (label_w + cols * cell, head_h + len(names) * cell), "white")
    draw = ImageDraw.Draw(out)
    for j, (prompt, _) in enumerate(grid[names[0]]):
        for k, line in enumerate(_wrap(prompt, 22)[:5]):
            draw.text((label_w + j * cell + 2, 2 + 11 * k), line, fill="black")
    for i, name in enumerate(names):
        draw.text((4, head_h + i * cell + cell // 2 - 6), name, fill="black")
        for j, (_, img) in enumerate(grid[name]):
            out.paste(img.resize((cell, cell), Image.NEAREST), (label_w + j * cell, head_h + i * cell))
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


def markdown(result: dict, command: str) -> str:
    """The strategy table, the per-size breakdown, the checks and retrieval, as Markdown."""
    p = result["protocol"]
    sizes = p["sizes"]
    lines = [f"Command: `{command}`", "",
             f"{p['combinations']} combinations (sizes {', '.join(map(str, sizes))}), {p['seeds']} seeds each, "
             f"{p['steps']} steps, guidance {p['guidance']}; {result['seconds']:.0f} s in all.", "",
             "| strategy | all concepts | " + " | ".join(f"all, {k} LoRAs" for k in sizes)
             + " | per concept | base-concept confidence | images/s |",
             "|---|" + "---|" * (len(sizes) + 4)]
    for name, s in result["strategies"].items():
        by = s["by_size"]
        lines.append(f"| {name} | {s['all_concepts']:.3f} | "
                     + " | ".join(f"{by.get(k, by.get(str(k))):.3f}" for k in sizes)
                     + f" | {s['per_concept']:.3f} | {s['base_confidence']:.3f} | {s['images_per_s']:.1f} |")
    if "checks" in result:
        c = result["checks"]
        b = c["base_on_base"]
        lines += ["", f"Mini-world checks ({c['base_prompts']} base prompts, {c['lora_prompts']} prompts per LoRA, "
                  f"{c['images_per_prompt']} images each; goal: base >= 0.80 on its own concepts, < 0.10 on LoRA "
                  "concepts; each LoRA alone >= 0.80):", "",
                  f"- base model, base prompts: every named concept {b['all_concepts']:.3f}, per concept "
                  + ", ".join(f"{k} {v:.2f}" for k, v in b["concepts"].items()), "",
                  "| LoRA | concept | base model alone | LoRA alone |", "|---|---|---|---|"]
        for spec in LORAS:
            lines.append(f"| {spec.name} | {spec.category}={spec.value} | {c['base_on_lora_concepts'][spec.name]:.2f} | "
                         f"{c['lora_alone'][spec.name]:.2f} |")
    if "retrieval_recall_at_k" in result:
        r = result["retrieval_recall_at_k"]
        lines += ["", "Retriever, `--loras auto` with top_k = k on the same prompts: "
                  + ", ".join(f"recall@{k} {v:.3f}" for k, v in r.items())]
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, section: str) -> None:
    """Replace the text between the eval markers in ``doc`` (or append it)."""
    start, end = "<!-- eval:results -->", "<!-- /eval:results -->"
    text = doc.read_text() if doc.exists() else "# Evaluation on the mini world\n\n"
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
