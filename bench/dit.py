"""Every strategy on DiT pipelines (tiny FLUX.1 and SD3): denoiser rows and time per image, and how far each
picture is from merge's, and how far ``gated`` moves from merge once the LoRAs have trigger words.

The tiny pipelines of ``lora_composer.tiny_dit`` (no hub: FLUX.1-shaped with distilled guidance, SD3-shaped
with classifier-free guidance), two random LoRAs on every transformer Linear and the CLIP text encoders,
written by the pipeline class's own ``save_lora_weights``. A smoke run that every strategy composes on a
transformer; real FLUX.1 figures need a GPU (``bench.gpu`` has FLUX.1's shapes). On a DiT ``gated`` reads the
joint attention on each LoRA's trigger words, so it is run once more on copies of the same files that name
trigger words in a sidecar (the other strategies keep files without any: their rows do not move), on the
prompt and on one without the second LoRA's trigger word.

    python -m bench.dit [--tiny] [--no-write] [--steps N] [--size PX]
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from lora_composer import tiny_dit
from lora_composer.errors import ComposerError, one_line
from lora_composer.fusion.registry import STRATEGIES, available
from lora_composer.pipeline import ComposerPipeline

NAME = "dit"
PROMPT = "a red circle"
WEIGHTS = (0.8, 0.6)
GUIDANCE = {"flux": 3.5, "sd3": 5.0}
TEXT = {"flux": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}
TRIGGERS = ("red", "circle")  # words of PROMPT, one per LoRA
OTHER_PROMPT = "a red square"  # without the second LoRA's trigger word
REFUSED: dict[str, str] = {}  # strategy -> why it refused a DiT pipeline (this run)
COLUMNS = [
    "model",
    "strategy",
    "prompt",
    "trigger words",
    "rows per image",
    "rows vs merge",
    "seconds per image",
    "max abs diff vs merge",
    "gates (last measure, mean over blocks)",
    "finite",
]


def _loras(pipe, family: str, folder: Path) -> list[tuple[Path, float]]:
    out = []
    for i, w in enumerate(WEIGHTS):
        layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=i + 1, text_encoders=TEXT[family])
        out.append((tiny_dit.save_dit_diffusers_lora(pipe, layers, folder / f"{family}-{i}.safetensors", rank=4), w))
    return out


def _with_triggers(loras, folder: Path) -> list[tuple[Path, float]]:
    """Copies of the files, each with its trigger word in an AUTOMATIC1111 sidecar (``NAME.json``)."""
    out = []
    for (path, w), word in zip(loras, TRIGGERS):
        copy_path = folder / f"{path.stem}-trigger{path.suffix}"
        shutil.copyfile(path, copy_path)
        copy_path.with_suffix(".json").write_text(json.dumps({"activation text": word}))
        out.append((copy_path, w))
    return out


def _gates(strategy) -> str:
    """``gated``'s last measured gates (before the schedule's blend), per LoRA, averaged over its blocks."""
    gates = getattr(strategy, "gates", None)
    if gates is None or not strategy.attention:
        return "-"
    blocks = [i for i, g in enumerate(strategy.layer_groups) if ".transformer_blocks." in g or "single_" in g]
    return " / ".join(f"{float(v):.2f}" for v in gates[blocks].mean(0))


def run_model(family: str, steps: int, size: int, folder: Path) -> list[dict]:
    build = tiny_dit.build_tiny_flux_pipeline if family == "flux" else tiny_dit.build_tiny_sd3_pipeline
    pipe = build(seed=0)
    loras = _loras(pipe, family, folder)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    call = dict(
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="np",
        max_sequence_length=16,
        guidance_scale=GUIDANCE[family],
        seed=0,
        progress=False,
    )
    model = f"tiny {family.upper() if family == 'sd3' else 'FLUX.1'}"
    rows, merged, merge_rows = [], None, None

    def row(name, prompt, words, image, n_rows, seconds, reference, strategy):
        common.log(f"[{NAME}] {family} {name} ({prompt!r}, trigger words {words}): {n_rows} rows, {seconds:.2f} s")
        return {
            "model": model,
            "strategy": name,
            "prompt": prompt,
            "trigger words": words,
            "rows per image": n_rows,
            "rows vs merge": n_rows / merge_rows,
            "seconds per image": seconds,
            "max abs diff vs merge": float(np.abs(image - reference).max()),
            "gates (last measure, mean over blocks)": _gates(strategy) if name == "gated" else "-",
            "finite": bool(np.isfinite(image).all()),
        }

    # regional needs a UNet (SD 1.x/2.x, SDXL) and a prompt split into regions
    for name in ["merge", *[s for s in available() if s != "merge" and not STRATEGIES[s].regional]]:
        t0 = time.perf_counter()
        try:
            image = composer(PROMPT, loras=loras, strategy=name, **call)
        except ComposerError as exc:  # a strategy that refuses this model: said in the notes, not a row
            REFUSED.setdefault(name, one_line(exc))
            common.log(f"[{NAME}] {family} {name}: refused ({one_line(exc)})")
            continue
        seconds = time.perf_counter() - t0
        n_rows = composer.last_driver.rows
        if name == "merge":
            merged, merge_rows = image, n_rows
        rows.append(row(name, PROMPT, "none", image, n_rows, seconds, merged, composer.last_driver.strategy))
    # gated with trigger words, against merge of the same files on the same prompt (a composer of their own)
    triggered = _with_triggers(loras, folder)
    words = " / ".join(TRIGGERS)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    for prompt in (PROMPT, OTHER_PROMPT):
        reference = composer(prompt, loras=triggered, **call)
        t0 = time.perf_counter()
        image = composer(prompt, loras=triggered, strategy="gated", **call)
        seconds = time.perf_counter() - t0
        driver = composer.last_driver
        rows.append(row("gated", prompt, words, image, driver.rows, seconds, reference, driver.strategy))
    return rows


def run(
    tiny: bool = False, steps: int | None = None, size: int | None = None, argv: list[str] | None = None
) -> common.Result:
    steps = steps or (2 if tiny else 8)
    size = size or (16 if tiny else 32)
    REFUSED.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # layers this small lose to thread overhead
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [r for family in ("flux", "sd3") for r in run_model(family, steps, size, Path(tmp))]
        return _result(rows, tiny, steps, size, argv)  # built here: its header reads the thread count
    finally:
        torch.set_num_threads(threads)


def _result(rows, tiny, steps, size, argv) -> common.Result:
    return common.Result(
        name=NAME,
        title="Every strategy on DiT pipelines (tiny FLUX.1 and SD3)" + (" (tiny smoke run)" if tiny else ""),
        columns=COLUMNS,
        rows=rows,
        notes=[
            *[f"`{name}` refuses these models: {why}" for name, why in sorted(REFUSED.items())],
            "FLUX.1 uses distilled guidance (no classifier-free batch: one row per image per row group); SD3 uses "
            "classifier-free guidance (two). Strategies with several row groups run them as rows of one batched pass.",
            "A diff of 0 vs merge means the strategy reduces to merge on this model. `gated` reads the joint "
            "attention that image tokens pay each LoRA's trigger-word tokens: with files that name no trigger "
            "words (trigger words none) it is merge exactly; its last rows use copies of the same files with "
            f"trigger words {' and '.join(repr(w) for w in TRIGGERS)} (one per LoRA), each against merge of those "
            "files on the same prompt. Gates are LoRA 1 / LoRA 2 (mean 1; a LoRA whose trigger word the prompt "
            "lacks is gated towards 0) before the default schedule's blend towards merge (`early`: full at the "
            "first step, merge at the last); the first denoiser call runs at the user's weights, since the "
            "attention it is measured from belongs to that call.",
        ],
        setup=[
            f"Models: `tiny_dit.build_tiny_flux_pipeline` and `build_tiny_sd3_pipeline` (random weights), {size}x{size} "
            f"pixels, {steps} steps, guidance {GUIDANCE['flux']} (FLUX.1) and {GUIDANCE['sd3']} (SD3), one torch thread.",
            f"Two rank-4 LoRAs at weights {', '.join(map(str, WEIGHTS))} on every transformer Linear and the CLIP "
            "text encoder(s); one image per strategy, seed 0, each strategy's default arguments.",
        ],
        command=common.command("bench.dit", argv if argv is not None else []),
    )


def main(argv: list[str] | None = None) -> common.Result:
    def options(p):
        p.add_argument("--steps", type=int, default=None, help="denoising steps (default 8, tiny 2)")
        p.add_argument("--size", type=int, default=None, help="image side in pixels (default 32, tiny 16)")

    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
