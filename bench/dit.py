"""Every strategy on DiT pipelines (tiny FLUX.1 and SD3): denoiser rows and time per image, and how far each
picture is from merge's.

The tiny pipelines of ``lora_composer.tiny_dit`` (no hub: FLUX.1-shaped with distilled guidance, SD3-shaped
with classifier-free guidance), two random LoRAs on every transformer Linear and the CLIP text encoders,
written by the pipeline class's own ``save_lora_weights``. A smoke run that every strategy composes on a
transformer; real FLUX.1 figures need a GPU (``bench.gpu`` has FLUX.1's shapes).

    python -m bench.dit [--tiny] [--no-write] [--steps N] [--size PX]
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from lora_composer import tiny_dit
from lora_composer.fusion.registry import STRATEGIES, available
from lora_composer.pipeline import ComposerPipeline

NAME = "dit"
PROMPT = "a red circle"
WEIGHTS = (0.8, 0.6)
GUIDANCE = {"flux": 3.5, "sd3": 5.0}
TEXT = {"flux": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}
COLUMNS = ["model", "strategy", "rows per image", "rows vs merge", "seconds per image", "max abs diff vs merge", "finite"]


def _loras(pipe, family: str, folder: Path) -> list[tuple[Path, float]]:
    out = []
    for i, w in enumerate(WEIGHTS):
        layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=i + 1, text_encoders=TEXT[family])
        out.append((tiny_dit.save_dit_diffusers_lora(pipe, layers, folder / f"{family}-{i}.safetensors", rank=4), w))
    return out


def run_model(family: str, steps: int, size: int, folder: Path) -> list[dict]:
    build = tiny_dit.build_tiny_flux_pipeline if family == "flux" else tiny_dit.build_tiny_sd3_pipeline
    pipe = build(seed=0)
    loras = _loras(pipe, family, folder)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    call = dict(num_inference_steps=steps, height=size, width=size, output_type="np", max_sequence_length=16,
                guidance_scale=GUIDANCE[family], seed=0, progress=False)
    rows, merged, merge_rows = [], None, None
    # regional needs a UNet (SD 1.x/2.x, SDXL) and a prompt split into regions
    for name in ["merge", *[s for s in available() if s != "merge" and not STRATEGIES[s].regional]]:
        t0 = time.perf_counter()
        image = composer(PROMPT, loras=loras, strategy=name, **call)
        seconds = time.perf_counter() - t0
        n_rows = composer.last_driver.rows
        if name == "merge":
            merged, merge_rows = image, n_rows
        rows.append({"model": f"tiny {family.upper() if family == 'sd3' else 'FLUX.1'}", "strategy": name,
                     "rows per image": n_rows, "rows vs merge": n_rows / merge_rows, "seconds per image": seconds,
                     "max abs diff vs merge": float(np.abs(image - merged).max()), "finite": bool(np.isfinite(image).all())})
        common.log(f"[{NAME}] {family} {name}: {n_rows} rows, {seconds:.2f} s")
    return rows


def run(tiny: bool = False, steps: int | None = None, size: int | None = None, argv: list[str] | None = None) -> common.Result:
    steps = steps or (2 if tiny else 8)
    size = size or (16 if tiny else 32)
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
            "FLUX.1 uses distilled guidance (no classifier-free batch: one row per image per row group); SD3 uses "
            "classifier-free guidance (two). Strategies with several row groups run them as rows of one batched pass.",
            "A diff of 0 vs merge means the strategy reduces to merge on this model: `gated` reads the UNet's "
            "cross-attention keys/values (`attn2`), which DiT pipelines do not have.",
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
