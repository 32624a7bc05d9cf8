"""Composition strategies side by side on one pipeline: what each costs per image and per step.

1. **Composite** (``ComposerPipeline(..., strategy="composite")``: the N adapters as row groups of one
   batched denoiser pass) against the sequential reference of Zhong et al.'s code (one denoiser pass per
   adapter per step, the N predictions averaged). The reference is a wrapper over the UNet's forward that,
   for each adapter, sets that adapter alone through our runtime (``rt.set_weights``) and calls the
   forward, so both run the very same patched layers and differ only in batching. Outputs must agree.
2. **CMLoRA** with its caching schedule against composite and against CMLoRA without caching (same
   adapters, same steps): time, denoiser rows computed, and how far the latents move (an approximation).
3. **Switch** and **gated** against **merge**: the strategy's per-step overhead (driver: observe + plan +
   mixing-tensor write + row expansion and combine; plus the layers' scale refresh, made eager with
   ``rt.prepare()`` just before each UNet forward so it is timed on its own), measured in the generation
   as the denoiser call's time minus the UNet forward's, and again by replaying the strategy's calls
   without the UNet; plus end-to-end time per image.

    python -m bench.strategies [--tiny] [--no-write] [--ns 2 3 5] [--steps 4] [--cm-steps 8] [--repeats 3]
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import common
from lora_composer import tiny

NAME = "strategies"
PROMPT = "a castle on a hill, ink drawing"
GUIDANCE = 7.5
SEED = 0
WEIGHTS = (1.0, 0.8, 0.9, 0.7, 0.6)  # user (UNet) weights of adapters a0..a4
REPLAY_ROUNDS = 25
GOAL_PCT = 2.0

COMPOSITE_COLUMNS = [
    "adapters",
    "steps",
    "ours passes",
    "ours rows",
    "reference passes",
    "reference rows",
    "ours denoiser per image (s)",
    "reference denoiser per image (s)",
    "speedup",
    "ours per step (s)",
    "reference per step (s)",
    "max abs latent diff",
    "equal output",
]
CMLORA_COLUMNS = [
    "strategy",
    "adapters",
    "steps",
    "denoiser passes",
    "rows computed",
    "rows vs composite",
    "denoiser per image (s)",
    "time vs composite",
    "max abs latent diff vs composite",
    "max abs latent diff vs cmlora without cache",
]
OVERHEAD_COLUMNS = [
    "strategy",
    "adapters",
    "steps",
    "UNet forward per step (ms)",
    "driver per step (ms)",
    "layer refresh per step (ms)",
    "overhead per step (ms)",
    "overhead % of step",
    "first step overhead (ms)",
    "replayed plan + write + refresh (ms)",
    "replayed % of step",
    "end-to-end per image (s)",
    "vs merge",
]


# -- models and adapters ----------------------------------------------------------------------------
def build_pipeline(tiny_mode: bool, seed: int = 0):
    """``(pipe, label)``: the tiny SD1.5-shaped pipeline, or the SD1.5-shaped UNet (random weights) with the
    tiny VAE and tokenizer and a one-layer 768-wide CLIP text encoder (the UNet's cross-attention width)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    with common.quiet_diffusers():
        small = tiny.build_tiny_sd15_pipeline(seed=seed)
        if tiny_mode:
            pipe, label = small, "tiny SD1.5-shaped UNet (block_out_channels (32, 64))"
        else:
            unet = common.build_sd15_unet(seed)
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=256,
                    num_hidden_layers=1,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    bos_token_id=49406,
                    eos_token_id=49407,
                    pad_token_id=49407,
                    hidden_act="quick_gelu",
                    projection_dim=768,
                )
            )
            pipe = StableDiffusionPipeline(**{**small.components, "unet": unet, "text_encoder": text_encoder})
            label = "SD1.5-shaped UNet (random weights)"
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    n = sum(p.numel() for p in pipe.unet.parameters())
    return pipe, f"{label}, {n / 1e6:.1f} M parameters"


def write_adapters(unet, n: int, folder: Path) -> list[Path]:
    """``n`` random rank-``RANK`` LoRAs on the attention layers, saved as diffusers-format files."""
    from lora_composer.adapters.io import save_adapter

    shapes = common.target_shapes(unet)
    paths = []
    for i in range(n):
        factors = common.random_factors(shapes, f"a{i}", seed=3000 + i)
        paths.append(save_adapter(factors.adapter(), folder / f"a{i}.safetensors"))
    return paths


# -- timing probes ----------------------------------------------------------------------------------
@dataclass
class Probe:
    """Times every denoiser call from the pipeline's side (``outer``: module hooks around the whole call,
    strategy driver included) and every UNet forward inside it (``forward``), with the layers' scale
    refresh made eager just before each forward and timed apart (``refresh``)."""

    outer: list[float] = field(default_factory=list)
    forward: list[list[float]] = field(default_factory=list)  # per outer call, the forwards it ran
    refresh: list[list[float]] = field(default_factory=list)
    _t0: float = 0.0

    def reset(self) -> None:
        self.outer, self.forward, self.refresh = [], [], []

    def install(self, unet, runtime) -> None:
        cls_forward = type(unet).forward

        def pre(module, args):
            self._t0 = time.perf_counter()
            self.forward.append([])
            self.refresh.append([])

        def post(module, args, output):
            self.outer.append(time.perf_counter() - self._t0)

        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            runtime.prepare()
            t1 = time.perf_counter()
            out = cls_forward(unet, *args, **kwargs)
            t2 = time.perf_counter()
            self.refresh[-1].append(t1 - t0)
            self.forward[-1].append(t2 - t1)
            return out

        unet.register_forward_pre_hook(pre)
        unet.register_forward_hook(post)
        unet.forward = inner  # an instance-level forward: the driver wraps it and restores it after
        self.inner = inner

    # per call
    def forward_per_call(self) -> list[float]:
        return [sum(f) for f in self.forward]

    def refresh_per_call(self) -> list[float]:
        return [sum(r) for r in self.refresh]

    def driver_per_call(self) -> list[float]:
        return [o - f - r for o, f, r in zip(self.outer, self.forward_per_call(), self.refresh_per_call())]

    def overhead_per_call(self) -> list[float]:
        return [o - f for o, f in zip(self.outer, self.forward_per_call())]


@dataclass
class Run:
    """One image: the latents, the probe's per-call times, the driver's pass/row counts, wall time."""

    latents: torch.Tensor
    outer: list[float]
    forward: list[float]
    single_forwards: list[float]
    refresh: list[float]
    driver: list[float]
    passes: int
    rows: int
    total_s: float
    strategy: object = None
    driver_obj: object = None

    @property
    def denoiser_s(self) -> float:
        return sum(self.outer)


def _collect(probe: Probe, latents, total_s, passes, rows, driver=None) -> Run:
    return Run(
        latents=latents.detach().float().clone(),
        outer=list(probe.outer),
        forward=probe.forward_per_call(),
        single_forwards=[f for call in probe.forward for f in call],
        refresh=probe.refresh_per_call(),
        driver=probe.driver_per_call(),
        passes=passes,
        rows=rows,
        total_s=total_s,
        strategy=getattr(driver, "strategy", None),
        driver_obj=driver,
    )


class Bench:
    def __init__(self, tiny_mode: bool, steps: int, size: int, folder: Path, n_adapters: int):
        from lora_composer.pipeline import ComposerPipeline

        self.pipe, self.model_label = build_pipeline(tiny_mode)
        self.cp = ComposerPipeline(self.pipe)
        self.steps, self.size, self.folder = steps, size, folder
        self.paths = write_adapters(self.pipe.unet, n_adapters, folder)
        self.names = [self.cp.load_lora(str(p)).name for p in self.paths]  # attached once, reused by every call
        self.probe = Probe()
        self.probe.install(self.pipe.unet, self.cp.runtime)
        self.call = dict(
            num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size, output_type="latent"
        )

    def loras(self, n: int):
        return [(str(p), w) for p, w in zip(self.paths[:n], WEIGHTS)]

    def ours(self, n: int, strategy: str, steps: int | None = None, **strategy_args) -> Run:
        self.probe.reset()
        call = {**self.call, "num_inference_steps": steps or self.steps}
        t0 = time.perf_counter()
        latents = self.cp(
            PROMPT,
            loras=self.loras(n),
            strategy=strategy,
            strategy_args=strategy_args or None,
            seed=SEED,
            progress=False,
            **call,
        )
        total = time.perf_counter() - t0
        d = self.cp.last_driver
        return _collect(self.probe, latents, total, d.calls, d.rows, d)

    def composite_reference(self, n: int) -> Run:
        """Zhong et al.'s LoRA Composite as their code runs it: per step, one denoiser pass per adapter with
        that adapter alone (set through our runtime), the predictions averaged."""
        unet, rt = self.pipe.unet, self.cp.runtime
        names, weights = self.names[:n], WEIGHTS[:n]
        inner = self.probe.inner
        counts = {"passes": 0, "rows": 0}

        def averaged(*args, **kwargs):
            outs = []
            for name, w in zip(names, weights):
                rt.set_weights(unet={name: w})
                outs.append(inner(*args, **kwargs))
                counts["passes"] += 1
                counts["rows"] += outs[-1].sample.shape[0] if not isinstance(outs[-1], tuple) else outs[-1][0].shape[0]
            if isinstance(outs[0], tuple):
                return (sum(o[0] for o in outs) / len(outs), *outs[0][1:])
            outs[0].sample = sum(o.sample for o in outs) / len(outs)
            return outs[0]

        self.probe.reset()
        unet.forward = averaged
        try:
            t0 = time.perf_counter()
            latents = self.pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), **self.call).images
            total = time.perf_counter() - t0
        finally:
            unet.forward = inner
        return _collect(self.probe, latents, total, counts["passes"], counts["rows"])

    def replay(self, run: Run, batch: int = 2, rounds: int = REPLAY_ROUNDS) -> list[float]:
        """Per step: ``plan`` + the mixing-tensor write (as the driver builds its rows) + ``rt.prepare()``,
        replayed over the generation's timesteps without the UNet (observe already happened)."""
        strat, driver, rt = run.strategy, run.driver_obj, self.cp.runtime
        timesteps = [float(t) for t in self.pipe.scheduler.timesteps]
        samples = []
        for _ in range(rounds):
            for step, t in enumerate(timesteps):
                t0 = time.perf_counter()
                plan = strat.plan(step, t)

                def rows_of(w):
                    return driver.groups.slot_rows(w, [0], batch)

                layer_rows = {g: rows_of(w) for g, w in (plan.layer_weights or {}).items()}
                rt.set_denoiser_rows(rows_of(plan.weights), layer_rows or None)
                rt.prepare()
                samples.append(time.perf_counter() - t0)
        return samples


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the three parts --------------------------------------------------------------------------------
def run_composite(b: Bench, ns, atol: float) -> list[dict]:
    rows = []
    for n in ns:
        common.log(f"[{NAME}] composite N={n}: ours (one batched pass per step), then the sequential reference")
        ours = b.ours(n, "composite")
        ref = b.composite_reference(n)
        diff = _diff(ours.latents, ref.latents)
        equal = diff <= atol
        assert equal, f"composite N={n}: ours and the sequential reference differ by {diff:.3g} (atol {atol})"
        rows.append(
            {
                "adapters": n,
                "steps": len(ours.outer),
                "ours passes": ours.passes,
                "ours rows": ours.rows,
                "reference passes": ref.passes,
                "reference rows": ref.rows,
                "ours denoiser per image (s)": ours.denoiser_s,
                "reference denoiser per image (s)": ref.denoiser_s,
                "speedup": ref.denoiser_s / ours.denoiser_s,
                "ours per step (s)": _med(ours.outer),
                "reference per step (s)": _med(ref.outer),
                "max abs latent diff": diff,
                "equal output": equal,
            }
        )
        common.log(f"[{NAME}] N={n}: ours {ours.denoiser_s:.2f} s, reference {ref.denoiser_s:.2f} s, diff {diff:.2e}")
    return rows


def run_cmlora(b: Bench, n: int, steps: int) -> tuple[list[dict], dict]:
    common.log(f"[{NAME}] cmlora vs composite: N={n}, {steps} steps")
    freq = {"frequency_cache": str(b.folder / "freq")}
    comp = b.ours(n, "composite", steps=steps)
    cached = b.ours(n, "cmlora", steps=steps, **freq)
    full = b.ours(n, "cmlora", steps=steps, cache=False, **freq)
    rows = []
    for label, r in (("composite", comp), ("cmlora (cache)", cached), ("cmlora (no cache)", full)):
        rows.append(
            {
                "strategy": label,
                "adapters": n,
                "steps": len(r.outer),
                "denoiser passes": r.passes,
                "rows computed": r.rows,
                "rows vs composite": r.rows / comp.rows,
                "denoiser per image (s)": r.denoiser_s,
                "time vs composite": r.denoiser_s / comp.denoiser_s,
                "max abs latent diff vs composite": _diff(r.latents, comp.latents),
                "max abs latent diff vs cmlora without cache": _diff(r.latents, full.latents),
            }
        )
    reuse = [bool(p.reuse is not None and bool(p.reuse.any())) for p in cached.driver_obj.history]
    extra = {
        "latent_abs_max": float(comp.latents.abs().max()),
        "latent_rms": float(comp.latents.pow(2).mean().sqrt()),
        "reused_steps": [i for i, r in enumerate(reuse) if r],
        "describe": cached.strategy.describe(),
    }
    return rows, extra


def run_overhead(b: Bench, n: int, repeats: int) -> tuple[list[dict], dict]:
    strategies = (("merge", {}), ("switch", {"every": 1}), ("gated", {}))
    runs: dict[str, list[Run]] = {s: [] for s, _ in strategies}
    for rep in range(repeats):
        for name, args in strategies:
            common.log(f"[{NAME}] overhead: {name} (repeat {rep + 1}/{repeats})")
            runs[name].append(b.ours(n, name, **args))
    rows = []
    for name, _ in strategies:
        rs = runs[name]
        # per-step figures: steps after the first (the first is reported on its own)
        forward = _med([f for r in rs for f in r.forward[1:]])
        driver = _med([d for r in rs for d in r.driver[1:]])
        refresh = _med([x for r in rs for x in r.refresh[1:]])
        overhead = _med([o - f for r in rs for o, f in zip(r.outer[1:], r.forward[1:])])
        first = _med([r.outer[0] - r.forward[0] for r in rs])
        replay = _med(b.replay(rs[-1]))
        total = _med([r.total_s for r in rs])
        rows.append(
            {
                "strategy": name + (" (every=1)" if name == "switch" else ""),
                "adapters": n,
                "steps": len(rs[0].outer),
                "UNet forward per step (ms)": forward * 1e3,
                "driver per step (ms)": driver * 1e3,
                "layer refresh per step (ms)": refresh * 1e3,
                "overhead per step (ms)": overhead * 1e3,
                "overhead % of step": 100 * overhead / forward,
                "first step overhead (ms)": first * 1e3,
                "replayed plan + write + refresh (ms)": replay * 1e3,
                "replayed % of step": 100 * replay / forward,
                "end-to-end per image (s)": total,
                "vs merge": None,
            }
        )
    merge_total = rows[0]["end-to-end per image (s)"]
    for row in rows:
        row["vs merge"] = f"x{row['end-to-end per image (s)'] / merge_total:.3f}"
    return rows, {"repeats": repeats}


# -- report -----------------------------------------------------------------------------------------
@dataclass
class Report:
    """The three tables of one run, rendered as one marked section of ``docs/BENCHMARKS.md``."""

    title: str
    setup: list[str]
    parts: dict[str, common.Result]
    command: str
    machine: dict[str, str] = field(default_factory=common.machine)

    def markdown(self) -> str:
        m = self.machine
        lines = [
            f"## {self.title}",
            "",
            f"- Machine: {m['machine']}; CPU: {m['cpu']}; torch threads: {m['threads']}. No GPU in this run: "
            "every figure is CPU time.",
            f"- Software: {m['versions']}",
            f"- Date: {m['date']}",
            f"- Command: `{self.command}`",
            *[f"- {s}" for s in self.setup],
            "",
        ]
        for part in self.parts.values():
            lines += [
                f"### {part.title}",
                "",
                *[f"- {s}" for s in part.setup],
                "",
                part.table(),
                "",
                *[f"{n}\n" for n in part.notes],
            ]
        return "\n".join(lines).rstrip() + "\n"

    def print(self) -> None:
        print(self.markdown())


def _composite_part(rows, steps, latent) -> common.Result:
    notes = []
    for r in rows:
        notes.append(
            f"N={r['adapters']}: ours {r['ours denoiser per image (s)']:.2f} s vs reference "
            f"{r['reference denoiser per image (s)']:.2f} s of denoiser time per image "
            f"({r['speedup']:.2f}x); latents agree to {r['max abs latent diff']:.1e}."
        )
    notes = [" ".join(notes)]
    notes.append(
        "Both compute the same rows (2N per step with classifier-free guidance); ours runs them as one "
        "batch, the reference as N batches of 2. On this CPU the UNet's convolutions dominate and scale "
        "almost linearly with rows, so batching saves the per-pass fixed costs (weight reads, small-kernel "
        f"launches, the {latent}x{latent} latents' low arithmetic intensity) rather than FLOPs."
    )
    return common.Result(
        name="composite",
        title="Composite: N row groups in one batched pass vs one pass per adapter",
        columns=COMPOSITE_COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            'Ours: `ComposerPipeline(...)(prompt, loras=..., strategy="composite")`, no `max_batch` (one pass of '
            "2N rows per step).",
            "Reference (sequential, as Zhong et al.'s code): the diffusers pipeline called directly, its UNet "
            "forward wrapped to run once per adapter with that adapter alone, set through our runtime "
            "(`rt.set_weights(unet={name: w})`), and the N predictions averaged. Same patched layers as ours, "
            "so the comparison isolates batching (PEFT's layers are compared in the sections above).",
            "Denoiser time per image: sum over steps of each denoiser call as the pipeline sees it (driver or "
            f"reference wrapper included); per step: median over the {steps} steps. Equal output: final latents "
            "agree within 1e-4 (asserted).",
        ],
    )


def _cmlora_part(rows, extra) -> common.Result:
    c, cached, full = rows
    d = extra["describe"]
    notes = [
        f"Caching skipped the non-dominant adapters on steps {extra['reused_steps']} of {c['steps']} "
        f"(schedule intervals {d['cache_intervals']} on bounds {d['cache_bounds']}): {cached['rows computed']} "
        f"rows instead of {c['rows computed']} ({cached['rows vs composite']:.2f}x), denoiser time "
        f"{cached['time vs composite']:.2f}x composite's.",
        f"Output: caching alone moves the final latents by {cached['max abs latent diff vs cmlora without cache']:.3g} "
        f"(max abs; latents' max {extra['latent_abs_max']:.3g}, RMS {extra['latent_rms']:.3g}); CMLoRA's dominant "
        f"weighting (dom_weight {d['dom_weight']}, switch_every {d['switch_every']}) moves them "
        f"{full['max abs latent diff vs composite']:.3g} from composite even without caching. Caching is an "
        "approximation by design; these are random adapters on a random UNet, so the size of the difference says "
        "nothing about image quality.",
    ]
    return common.Result(
        name="cmlora",
        title="CMLoRA with caching vs composite",
        columns=CMLORA_COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            "Same adapters, weights, prompt, seed and steps for the three; CMLoRA with its defaults (order as given: "
            "no frequency profile), once with the non-uniform cache and once with `cache=False`.",
            "Rows computed: batch rows the denoiser actually ran over the image (the driver's count); with "
            "classifier-free guidance each row group is 2 rows.",
        ],
    )


def _overhead_part(rows, extra) -> common.Result:
    notes = []
    for r in rows[1:]:
        ok = r["overhead % of step"] < GOAL_PCT and r["replayed % of step"] < GOAL_PCT
        notes.append(
            f"Goal ({r['strategy']}: per-step strategy overhead under {GOAL_PCT:g}% of a denoiser step): "
            f"{'met' if ok else 'NOT met'}, {r['overhead % of step']:.3f}% measured in the generation, "
            f"{r['replayed % of step']:.3f}% replayed ({r['overhead per step (ms)']:.2f} ms and "
            f"{r['replayed plan + write + refresh (ms)']:.2f} ms against a {r['UNet forward per step (ms)']:.0f} ms step); "
            f"end to end {r['vs merge']} merge's time per image."
        )
    notes.append(
        "Overhead per step = the denoiser call's time minus the UNet forward's: the driver (observe, plan, "
        "mixing-tensor write, row bookkeeping, combine) plus the layers' scale refresh (`rt.prepare()`, timed "
        "just before each forward; without it the same refresh would run lazily inside the forward). Medians "
        f"over the steps after the first of {extra['repeats']} image(s) per strategy, strategies interleaved image by image. "
        '"First step" includes one-off work (gated\'s per-adapter prompt responses). "Replayed" times '
        f"`plan` + the driver's row write + `rt.prepare()` alone, {REPLAY_ROUNDS} passes over the generation's "
        "timesteps, with no UNet in between. Merge writes the same weights every step, so after the first "
        "step its write and refresh are no-ops; switch (every=1) and gated change weights on every step."
    )
    notes.append(
        "End-to-end differences of a fraction of a percent are inside this shared VM's noise; the direct "
        "overhead measurements are the figures to read."
    )
    return common.Result(
        name="overhead",
        title="Per-step overhead: switch and gated vs merge",
        columns=OVERHEAD_COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            "Ours only (no reference: the question is what the strategy adds to a plain step); each image one "
            "denoiser pass of 2 rows per step.",
        ],
    )


def run(
    tiny_mode: bool = False,
    ns=(2, 3, 5),
    steps: int | None = None,
    cm_steps: int | None = None,
    repeats: int | None = None,
    cm_n: int = 3,
    over_n: int = 3,
    size: int | None = None,
    atol: float = 1e-4,
    argv: list[str] | None = None,
) -> Report:
    steps = steps or (3 if tiny_mode else 4)
    size = size or (32 if tiny_mode else 64)
    cm_steps = cm_steps or (4 if tiny_mode else 8)
    repeats = repeats or (1 if tiny_mode else 3)
    ns = sorted(ns)
    n_adapters = max([*ns, cm_n, over_n])
    t_start = time.perf_counter()
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="bench-strategies-") as tmp:
        b = Bench(tiny_mode, steps, size, Path(tmp), n_adapters)
        latent = size // b.pipe.vae_scale_factor
        common.log(f"[{NAME}] {b.model_label}; {n_adapters} adapters attached; warm-up")
        b.ours(1, "merge", steps=1)
        for n in ns:  # first passes at each batch size are slow (allocator, oneDNN): keep them out of the tables
            b.ours(n, "composite", steps=1)
        composite_rows = run_composite(b, ns, atol)
        cm_rows, cm_extra = run_cmlora(b, cm_n, cm_steps)
        over_rows, over_extra = run_overhead(b, over_n, repeats)
        n_layers = len(b.cp.runtime.layers)
        model_label = b.model_label
        del b
        gc.collect()
    elapsed = time.perf_counter() - t_start
    load_end = _load()
    setup = [
        f"Model: {model_label}, fp32, eval, no grad, in a `StableDiffusionPipeline` with "
        + (
            "the tiny VAE, text encoder and tokenizer"
            if tiny_mode
            else "the tiny VAE and tokenizer (`lora_composer.tiny`) and a one-layer 768-wide CLIP text encoder"
        )
        + f" (only the denoiser is measured); {size}x{size} pixels = {latent}x{latent} latents, batch 1 image, "
        f"classifier-free guidance {GUIDANCE} (2 rows per adapter group), DDIM.",
        f"Adapters: rank-{common.RANK} LoRAs with random non-zero factors on the {n_layers} attention layers "
        f"({', '.join(common.TARGETS)}), saved as diffusers-format files and attached once to one "
        f"`ComposerPipeline`; user weights {', '.join(f'{w:g}' for w in WEIGHTS[:n_adapters])} in order.",
        f"Steps: {steps} per image (composite, overhead), {cm_steps} (CMLoRA, so that its cache schedule skips "
        f"steps). Whole run: {elapsed / 60:.1f} min.",
        f"Machine load (1-minute load average) at start and end: {load_start} and {load_end} on "
        f"{os.cpu_count()} cores. Above the core count, other jobs shared the CPU: images timed one after "
        "the other then carry that noise (the equal-output checks and row counts do not).",
    ]
    parts = {
        "composite": _composite_part(composite_rows, steps, latent),
        "cmlora": _cmlora_part(cm_rows, cm_extra),
        "overhead": _overhead_part(over_rows, over_extra),
    }
    return Report(
        title="Composition strategies: composite, CMLoRA, switch, gated" + (" (tiny smoke run)" if tiny_mode else ""),
        setup=setup,
        parts=parts,
        command=common.command("bench.strategies", argv if argv is not None else []),
    )


def main(argv: list[str] | None = None) -> Report:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 3, 5], help="adapter counts for composite")
    parser.add_argument("--steps", type=int, default=None, help="steps per image (default 4, tiny 3)")
    parser.add_argument("--cm-steps", type=int, default=None, help="steps for the CMLoRA part (default 8, tiny 4)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="images per strategy for the overhead part (default 3, tiny 1)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels, latents are half with the tiny VAE (default 64, tiny 32)",
    )
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    report = run(
        tiny_mode=args.tiny,
        ns=args.ns,
        steps=args.steps,
        cm_steps=args.cm_steps,
        repeats=args.repeats,
        size=args.size,
        argv=sys.argv[1:] if argv is None else argv,
    )
    report.print()
    if not args.no_write:
        common.log(f"[{NAME}] wrote {common.write_section(NAME, report.markdown())}")
    return report


if __name__ == "__main__":
    main()
