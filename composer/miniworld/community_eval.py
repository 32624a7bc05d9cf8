"""``compose eval --world community``: every strategy on the community world (variants of known values).

The one-object protocol (:mod:`~lora_composer.miniworld.evaluate`) on the community world: every set of 2, 3
and 4 of its five variant LoRAs (one per category), each on ``scenes`` prompts whose other shape, colour and
background are drawn from the base values (the base's star and purple included), ``seeds`` images per prompt.
A picture counts when the detectors find every requested variant; confusing a variant with its generic value
(purple for vexa purple) is the regime's typical miss. Checks: the base renders its own values and never a
variant, even when the prompt says the trigger word; each LoRA alone renders its variant.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch

from lora_composer.miniworld import assets, community
from lora_composer.miniworld.community_library import LORAS, library_dir
from lora_composer.miniworld.evaluate import Evaluator, Tally, _grid_picks, draw, save_grid, strategy_tables

BASE_CATEGORIES = ("shape", "colour", "background")  # drawn per prompt from the base values
STRATEGIES = (
    "merge",
    "gated",
    "switch",
    "composite",
    "cmlora",
    "loratorio",
    "klora",
    "conjunction",
    "marginal",
    "tsv",
    "dare",
    "ties",
    "activation-matched",
)  # every one-object strategy (regional needs regions)


def weights_dir() -> Path:
    return assets.WEIGHTS / "community"


def detector_path() -> Path:
    return weights_dir() / "detectors.safetensors"


def load_pipeline(library=None, device: str | None = None):
    """The shipped model with the community UNet (fp16 file, fp32 model) and text-encoder layers in place."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lora_composer.miniworld.text_layers import TEXT_LAYERS, apply_text_layers
    from lora_composer.pipeline import ComposerPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        assets.model_dir(), safety_checker=None, requires_safety_checker=False
    )
    pipe.unet = UNet2DConditionModel.from_pretrained(weights_dir() / "unet", torch_dtype=torch.float32)
    pipe.register_modules(unet=pipe.unet)
    apply_text_layers(pipe.text_encoder, weights_dir() / TEXT_LAYERS)
    pipe.set_progress_bar_config(disable=True)
    if device:
        pipe.to(device)
    composer = ComposerPipeline(pipe, library=library or library_dir(), model=str(assets.model_dir()))
    composer.world = community.NAME  # --strategy auto picks from this world's recorded runs
    return composer


def load_judge():
    from lora_composer.miniworld.detectors import load_detector

    return load_detector(detector_path(), community)


def combinations(sizes=(2, 3, 4)) -> list[tuple]:
    """Every set of ``k`` LoRAs for ``k`` in ``sizes`` (one LoRA per category, so every subset)."""
    return [c for k in sizes for c in itertools.combinations(LORAS, k)]


def scene_for(combo, rng: np.random.Generator) -> community.Scene:
    """The LoRAs' variants; shape, colour and background drawn from the base values elsewhere; filled, no
    character unless asked."""
    fields = {c.name: c.base[0] for c in community.CATEGORIES}
    for cat in BASE_CATEGORIES:
        fields[cat] = str(rng.choice(community.CATEGORY[cat].base))
    for spec in combo:
        fields[spec.category] = spec.value
    return community.Scene(**fields)


def checks(ev: Evaluator, base_prompts: int = 24, lora_prompts: int = 8, seed: int = 0, progress=None) -> dict:
    """The base on base prompts (every category named); per LoRA, its prompt (trigger word said) rendered by
    the base alone (variant rate: goal 0; generic rate) and by the LoRA alone (variant rate: goal >= 0.90)."""
    rng = np.random.default_rng(seed)
    base_tally = Tally()
    for i in range(base_prompts):
        scene = community.random_scene(rng)
        ev.run(community.caption(scene), [], "merge", seed + i, base_tally, scene.labels, scene.labels)
        progress and progress()
    variant_by_base, generic_by_base, alone = {}, {}, {}
    for spec in LORAS:
        t_base, t_generic, t_lora = Tally(), Tally(), Tally()
        for i in range(lora_prompts):
            prompt = community.caption(scene_for((spec,), rng))
            images = ev.run(prompt, [], "merge", seed + 100 + i, t_base, {spec.category: spec.value}, {})
            ev.judge(t_generic, images, {spec.category: community.GENERIC[spec.value]}, {})
            ev.run(prompt, [(spec.name, 1.0)], "merge", seed + 100 + i, t_lora, {spec.category: spec.value}, {})
        variant_by_base[spec.name] = t_base.summary()["all_concepts"]
        generic_by_base[spec.name] = t_generic.summary()["all_concepts"]
        alone[spec.name] = t_lora.summary()["all_concepts"]
        progress and progress()
    return {
        "images_per_prompt": ev.seeds,
        "base_prompts": base_prompts,
        "lora_prompts": lora_prompts,
        "base_on_base": base_tally.summary(),
        "base_renders_variant": variant_by_base,
        "base_renders_generic": generic_by_base,
        "lora_alone": alone,
    }


def evaluate(
    pipe,
    detector,
    strategies=STRATEGIES,
    sizes=(2, 3, 4),
    seeds: int = 1,
    scenes: int = 1,
    steps: int = 20,
    guidance: float = assets.DEFAULT_GUIDANCE,
    seed: int = 0,
    grid_path: Path | None = None,
    with_checks: bool = True,
    progress: bool = True,
    per_size: int | None = None,
) -> dict:
    """The strategy table: every combination (or ``per_size`` of each size, drawn by :func:`draw`) on ``scenes``
    prompts, ``seeds`` images each, every strategy on the same prompts and seeds; plus the checks."""
    from tqdm.auto import tqdm

    combos = draw(combinations(sizes), per_size, seed)
    ev = Evaluator(pipe, detector, steps=steps, guidance=guidance, seeds=seeds)
    bar = tqdm(
        total=len(combos) * scenes * len(strategies) + (24 + len(LORAS) if with_checks else 0),
        desc="eval",
        unit="render",
        disable=not progress,
        dynamic_ncols=True,
    )
    result: dict = {
        "world": community.NAME,
        "protocol": {
            "sizes": list(sizes),
            "combinations": len(combos),
            "per_size": per_size,
            "scenes": scenes,
            "seeds": seeds,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "strategies": list(strategies),
        },
    }
    t_start = time.perf_counter()
    if with_checks:
        result["checks"] = checks(ev, seed=seed, progress=bar.update)
    picks = _grid_picks(combos)
    grid: dict[str, list] = {}
    result["strategies"] = {}
    for name in strategies:
        tally, by_combo = Tally(), {}
        rng = np.random.default_rng(seed)  # the same prompts and seeds for every strategy
        for i, combo in enumerate(combos):
            hits, shown = tally.all_hit, tally.images
            for j in range(scenes):
                scene = scene_for(combo, rng)
                wanted = {s.category: s.value for s in combo}
                base = {c: getattr(scene, c) for c in BASE_CATEGORIES if c not in wanted}
                prompt = community.caption(scene)
                images = ev.run(
                    prompt, [(s.name, 1.0) for s in combo], name, seed + scenes * i + j, tally, wanted, base
                )
                if i in picks and j == 0:
                    grid.setdefault(name, []).append((prompt, images[0]))
                bar.set_postfix(strategy=name)
                bar.update()
            by_combo["+".join(s.value for s in combo)] = [tally.all_hit - hits, tally.images - shown]
        result["strategies"][name] = {**tally.summary(), "by_combination": by_combo}
    bar.close()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if grid_path is not None and grid:
        save_grid(grid, grid_path)
        result["grid"] = str(grid_path)
    return result


def markdown(result: dict, command: str) -> str:
    """The strategy table (rows vs merge: denoiser rows per image over merge's), per concept, the checks."""
    p = result["protocol"]
    sizes = p["sizes"]
    lines = [
        f"Command: `{command}`",
        "",
        f"{p['combinations']} combinations (sizes {', '.join(map(str, sizes))}"
        + (f"; {p['per_size']} drawn per size" if p.get("per_size") else "")
        + f") x {p['scenes']} prompts x "
        f"{p['seeds']} images, seed {p['seed']}, {p['steps']} steps, guidance {p['guidance']}; "
        f"{result['seconds']:.0f} s in all.",
        "",
        *strategy_tables(result, [spec.value for spec in LORAS]),
    ]
    if "checks" in result:
        c = result["checks"]
        b = c["base_on_base"]
        lines += [
            "",
            f"Checks ({c['base_prompts']} base prompts, {c['lora_prompts']} prompts per LoRA, "
            f"{c['images_per_prompt']} images each; goals: the base never renders a variant, each LoRA alone "
            ">= 0.90):",
            "",
            f"- base model, base prompts (every category named): all named {b['all_concepts']:.3f}; per value "
            + ", ".join(f"{k} {v:.2f}" for k, v in b["concepts"].items()),
            "",
            "| LoRA | variant (of) | base alone: variant | base alone: generic value | LoRA alone: variant |",
            "|---|---|---|---|---|",
        ]
        for spec in LORAS:
            lines.append(
                f"| {spec.name} | {spec.value} ({community.GENERIC[spec.value]}) | "
                f"{c['base_renders_variant'][spec.name]:.2f} | {c['base_renders_generic'][spec.name]:.2f} | "
                f"{c['lora_alone'][spec.name]:.2f} |"
            )
    return "\n".join(lines) + "\n"
