"""Fuse + unfuse cycles of three adapters: time per cycle and how far the base weights drift.

Ours: ``set_weights`` + ``fuse()`` then ``unfuse()`` (restores a backup of the touched weights).
Reference: diffusers' ``pipe.fuse_lora(adapter_names=..., components=["unet"])`` then
``pipe.unfuse_lora(components=["unet"])`` (PEFT adds the delta, then recomputes and subtracts it).
After ``--cycles`` cycles the targeted weights are compared with the original base weights: ours must
be bit-identical (asserted); the reference's drift is reported as measured.

    python -m bench.fuse_cycles [--tiny] [--no-write] [--cycles 100] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import gc

import torch

from bench import common
from lora_composer.runtime import LoraRuntime

NAME = "fuse_cycles"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS = (1.0, 0.7, 0.5)
COLUMNS = [
    "dtype",
    "cycles",
    "ours fuse (ms)",
    "ours unfuse (ms)",
    "ours cycle (ms)",
    "diffusers fuse_lora (ms)",
    "diffusers unfuse_lora (ms)",
    "diffusers cycle (ms)",
    "speedup per cycle",
    "fused weights max diff",
    "ours drift",
    "diffusers drift",
    "diffusers weights not restored",
]
# Ours folds all adapters in fp32 and rounds once; PEFT rounds after each adapter: allow a few rounding
# steps (units of the dtype's epsilon times the largest fused weight), and fp32 noise.
FUSED_ULPS = 4


def _weights(unet, paths) -> dict[str, torch.Tensor]:
    """The live base weight tensor of each targeted layer (under PEFT it sits in ``.base_layer``)."""
    modules = dict(unet.named_modules())
    out = {}
    for p in paths:
        m = modules[p]
        out[p] = (m.get_base_layer() if hasattr(m, "get_base_layer") else m).weight
    return out


def _drift(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, int, int]:
    """(max abs difference, elements that differ, elements) against the original weights."""
    worst, changed, total = 0.0, 0, 0
    for p, w in weights.items():
        d = (w.detach().float() - base[p].float()).abs()
        worst = max(worst, float(d.max()))
        changed += int((w.detach() != base[p]).sum())
        total += w.numel()
    return worst, changed, total


def run_dtype(tiny: bool, dtype: torch.dtype, cycles: int, warmup: int = 1) -> dict:
    pipe, ours_host, model_label = common.build_models(tiny, dtype=dtype)
    shapes = common.target_shapes(ours_host.unet)
    paths = list(shapes)
    base = {p: w.detach().clone() for p, w in _weights(ours_host.unet, paths).items()}

    rt = LoraRuntime(ours_host)
    names = [f"f{i}" for i in range(len(WEIGHTS))]
    for i, name in enumerate(names):
        f = common.random_factors(shapes, name, seed=2000 + i)
        rt.add(f.adapter())
        common.add_peft_adapter(pipe.unet, f)
    w = dict(zip(names, WEIGHTS))
    pipe.set_adapters(names, list(WEIGHTS))
    ours_w, ref_w = _weights(ours_host.unet, paths), _weights(pipe.unet, paths)

    def ours_fuse():
        rt.set_weights(unet=w)
        rt.fuse()

    def ref_fuse():
        pipe.fuse_lora(components=["unet"], adapter_names=names)

    def ref_unfuse():
        pipe.unfuse_lora(components=["unet"])

    t = {k: [] for k in ("of", "ou", "rf", "ru")}
    fused_diff = None
    for c in range(warmup + cycles):
        of = common.timed(ours_fuse)
        rf = common.timed(ref_fuse)
        if fused_diff is None:  # equal work: both folded the same deltas
            fused_diff = max(float((ours_w[p].float() - ref_w[p].float()).abs().max()) for p in paths)
            fused_max = max(float(ours_w[p].float().abs().max()) for p in paths)
            if (ours_w[paths[0]] == base[paths[0]]).all():
                raise AssertionError("fusing did not change the weights")
        ou = common.timed(rt.unfuse)
        ru = common.timed(ref_unfuse)
        if c >= warmup:
            for k, v in zip(("of", "ou", "rf", "ru"), (of, ou, rf, ru)):
                t[k].append(v)
    ours_drift, ours_changed, total = _drift(ours_w, base)
    ref_drift, ref_changed, _ = _drift(ref_w, base)
    tol = max(1e-5, FUSED_ULPS * torch.finfo(dtype).eps * fused_max)
    assert fused_diff <= tol, f"{dtype}: fused weights differ by {fused_diff:.3g} (tolerance {tol:.3g})"
    assert ours_drift == 0 and ours_changed == 0, f"{dtype}: our unfuse left a drift of {ours_drift:.3g}"

    oc = [a + b for a, b in zip(t["of"], t["ou"])]
    rc = [a + b for a, b in zip(t["rf"], t["ru"])]
    label = next(k for k, v in DTYPES.items() if v == dtype)
    row = {
        "dtype": label,
        "cycles": warmup + cycles,
        "ours fuse (ms)": common.median_ms(t["of"]),
        "ours unfuse (ms)": common.median_ms(t["ou"]),
        "ours cycle (ms)": common.median_ms(oc),
        "diffusers fuse_lora (ms)": common.median_ms(t["rf"]),
        "diffusers unfuse_lora (ms)": common.median_ms(t["ru"]),
        "diffusers cycle (ms)": common.median_ms(rc),
        "speedup per cycle": common.median_ms(rc) / common.median_ms(oc),
        "fused weights max diff": fused_diff,
        "ours drift": ours_drift,
        "diffusers drift": ref_drift,
        "diffusers weights not restored": f"{ref_changed:,} of {total:,} ({100 * ref_changed / total:.1f}%)",
        "_model": model_label,
        "_layers": len(paths),
        "_max_base": max(float(b.float().abs().max()) for b in base.values()),
    }
    common.log(
        f"[{NAME}] {label}: ours {row['ours cycle (ms)']:.1f} ms/cycle, diffusers "
        f"{row['diffusers cycle (ms)']:.1f} ms/cycle; drift ours {ours_drift:.3g}, diffusers {ref_drift:.3g}"
    )
    del rt, pipe, ours_host, base, ours_w, ref_w
    gc.collect()
    return row


def run(
    tiny: bool = False, cycles: int | None = None, dtypes=("fp32", "bf16"), argv: list[str] | None = None
) -> common.Result:
    cycles = cycles or (10 if tiny else 100)
    rows = [run_dtype(tiny, DTYPES[d], cycles) for d in dtypes]
    first = rows[0]
    notes = [
        "Goal (unfuse restores the base weights bit-exactly): "
        + ("met" if all(r["ours drift"] == 0 for r in rows) else "NOT met")
        + ", drift exactly 0 in "
        + ", ".join(r["dtype"] for r in rows)
        + " (asserted).",
        "Drift is the largest absolute difference between a targeted weight after the last unfuse and the "
        f"original base weight (largest base weight magnitude: {first['_max_base']:.3g}). PEFT's unfuse "
        "recomputes each adapter's delta and subtracts it in the weight's dtype, so rounding accumulates "
        "cycle after cycle; ours copies back a backup taken at the first fuse.",
        '"fused weights max diff" compares our fused weights with diffusers\' right after the first fuse: '
        "ours folds the three adapters in fp32 and rounds once, PEFT adds them one at a time in the weight's "
        "dtype, so in half precision they may differ by a rounding step.",
    ]
    return common.Result(
        name=NAME,
        title="Fuse / unfuse cycles of three adapters" + (" (tiny smoke run)" if tiny else ""),
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            f"Model: {first['_model']}, eval, no grad; {first['_layers']} targeted layers "
            f"(attention {', '.join(common.TARGETS)}); three rank-{common.RANK} adapters with random non-zero "
            f"factors at weights {', '.join(map(str, WEIGHTS))}, identical for both runtimes.",
            "Reference: a diffusers `StableDiffusionPipeline` around that UNet, adapters injected with "
            "`unet.add_adapter(LoraConfig(...))`, weights set once with `pipe.set_adapters`; one cycle is "
            '`pipe.fuse_lora(components=["unet"], adapter_names=...)` + `pipe.unfuse_lora(components=["unet"])`. '
            "Ours: `rt.set_weights(...)` + `rt.fuse()`, then `rt.unfuse()`.",
            "Times are medians over the cycles after one warm-up cycle, ours and diffusers interleaved each "
            "cycle; the UNet (base weights and LoRA factors) is cast to the listed dtype before adapters are added.",
        ],
        command=common.command("bench.fuse_cycles", argv if argv is not None else []),
    )


def main(argv: list[str] | None = None) -> common.Result:
    def options(p):
        p.add_argument("--cycles", type=int, default=None, help="timed cycles per dtype (default 100, tiny 10)")
        p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))

    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
