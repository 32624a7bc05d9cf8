"""Cost of changing adapter weights between denoising steps with K adapters loaded.

Ours: ``LoraRuntime.set_weights`` (a write to the mixing tensor), and ``set_weights`` + ``prepare()``
(which also does the per-layer refresh that would otherwise happen lazily at the next forward).
Reference: diffusers' ``pipe.set_adapters(names, weights)`` on PEFT adapters. Each step activates a
different pair of adapters with different weights; every other adapter is loaded but inactive.
After the last step both UNets are run on one small input and must agree within ``--atol``.

    python -m bench.switch_weights [--tiny] [--no-write] [--ks 1 10 50] [--steps 20]
"""

from __future__ import annotations

import gc

from bench import common
from lora_composer.runtime import LoraRuntime

NAME = "switch_weights"
ALONE_STEPS = 200
COLUMNS = [
    "adapters loaded",
    "active",
    "ours set_weights alone, back to back (ms)",
    "ours set_weights (ms)",
    "ours set_weights + prepare (ms)",
    "diffusers set_adapters (ms)",
    "speedup vs set_weights + prepare",
    "speedup vs set_weights",
    "max abs out diff",
    "LoRA effect on out",
    "equal work",
]


def schedule(step: int, k: int) -> dict[str, float]:
    """Step ``step``'s active adapters and weights: two of the ``k`` (one when ``k == 1``), rotating."""
    a, b = step % k, (step + 1) % k
    wa = 0.5 + 0.05 * (step % 7)
    if k == 1:
        return {f"a{a}": wa}
    return {f"a{a}": wa, f"a{b}": 1.1 - 0.05 * (step % 5)}


def run(
    tiny: bool = False,
    ks=(1, 10, 50),
    steps: int | None = None,
    warmup: int = 2,
    atol: float = 1e-4,
    argv: list[str] | None = None,
) -> common.Result:
    steps = steps or (6 if tiny else 20)
    ks = sorted(ks)
    pipe, ours_host, model_label = common.build_models(tiny)
    rt = LoraRuntime(ours_host)
    shapes = common.target_shapes(pipe.unet)
    inputs = common.small_unet_input(pipe.unet)
    base_out = common.unet_out(pipe.unet, inputs)

    rows, loaded = [], 0
    for k in ks:
        common.log(f"[{NAME}] loading adapters {loaded}..{k - 1}")
        for i in range(loaded, k):
            f = common.random_factors(shapes, f"a{i}", seed=1000 + i)
            rt.add(f.adapter())
            common.add_peft_adapter(pipe.unet, f)
            del f
        loaded = k
        gc.collect()

        # the write alone, back to back (nothing else between calls to disturb caches)
        t_alone = [common.timed(lambda: rt.set_weights(unet=schedule(s, k))) for s in range(ALONE_STEPS)]
        t_write, t_prep, t_ref = [], [], []
        for step in range(warmup + steps):
            w = schedule(step, k)
            names, weights = list(w), list(w.values())
            # ours: the write alone, then the refresh it implies (one measurement gives both)
            w_s = common.timed(lambda: rt.set_weights(unet=w))
            p_s = common.timed(rt.prepare)
            r_s = common.timed(lambda: pipe.set_adapters(names, weights))
            if step >= warmup:
                t_write.append(w_s)
                t_prep.append(w_s + p_s)
                t_ref.append(r_s)

        out_ref = common.unet_out(pipe.unet, inputs)
        out_ours = common.unet_out(ours_host.unet, inputs)
        diff = float((out_ref - out_ours).abs().max())
        effect = float((out_ref - base_out).abs().max())
        equal = diff <= atol and effect > 100 * atol
        assert equal, f"K={k}: outputs differ by {diff:.3g} (atol {atol}), LoRA effect {effect:.3g}"
        write, prep, ref = (common.median_ms(t) for t in (t_write, t_prep, t_ref))
        rows.append(
            {
                "adapters loaded": k,
                "active": len(schedule(0, k)),
                "ours set_weights alone, back to back (ms)": common.median_ms(t_alone),
                "ours set_weights (ms)": write,
                "ours set_weights + prepare (ms)": prep,
                "diffusers set_adapters (ms)": ref,
                "speedup vs set_weights + prepare": ref / prep,
                "speedup vs set_weights": ref / write,
                "max abs out diff": diff,
                "LoRA effect on out": effect,
                "equal work": equal,
            }
        )
        common.log(
            f"[{NAME}] K={k}: ours {write:.3f} ms write, {prep:.3f} ms with prepare; "
            f"diffusers {ref:.1f} ms; out diff {diff:.2e}"
        )

    n_layers = len(rt.layers)
    del rt, ours_host, pipe
    gc.collect()
    return _result(rows, tiny, steps, model_label, n_layers, argv)


def _result(rows, tiny, steps, model_label, n_layers, argv) -> common.Result:
    notes = []
    last, first = rows[-1], rows[0]
    speed = last["speedup vs set_weights + prepare"]
    growth = last["ours set_weights + prepare (ms)"] / first["ours set_weights + prepare (ms)"]
    growth_w = last["ours set_weights (ms)"] / first["ours set_weights (ms)"]
    ref_growth = last["diffusers set_adapters (ms)"] / first["diffusers set_adapters (ms)"]
    k0, k1 = first["adapters loaded"], last["adapters loaded"]
    notes.append(
        f"Goal (with {k1} adapters loaded, at least 100x faster than `set_adapters`): "
        f"{'met' if speed >= 100 else 'NOT met'}, {speed:,.0f}x including `prepare()` "
        f"({last['speedup vs set_weights']:,.0f}x for the write alone)."
    )
    notes.append(
        f"Goal (cost does not grow with inactive adapters): from {k0} to {k1} adapters loaded, "
        f"`set_weights` alone goes x{growth_w:.2f}, `set_weights + prepare()` x{growth:.2f} "
        f"(diffusers `set_adapters`: x{ref_growth:.1f})."
    )
    notes.append(
        "`prepare()` refreshes each patched layer's per-rank scales and gathers the active adapters' "
        "rank columns; without it the same work happens lazily inside the next UNet forward, so the "
        "`set_weights + prepare` column is the honest per-step cost."
    )
    notes.append(
        f'"set_weights alone, back to back" is the median of {ALONE_STEPS} consecutive changes with nothing in '
        'between; the interleaved "ours set_weights" column is measured right after diffusers\' '
        "`set_adapters` has walked the whole model, so it includes cold-cache effects."
    )
    return common.Result(
        name=NAME,
        title="Switching adapter weights between steps" + (" (tiny smoke run)" if tiny else ""),
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            f"Model: {model_label}, fp32, eval, no grad; {n_layers} patched layers "
            f"(attention {', '.join(common.TARGETS)}), rank-{common.RANK} adapters with random non-zero factors, "
            "identical for both runtimes.",
            "Reference: a diffusers `StableDiffusionPipeline` around that UNet, adapters injected with "
            "`unet.add_adapter(LoraConfig(...))` and the same factors copied in; timed call: "
            "`pipe.set_adapters(names, weights)`.",
            f"Per step two adapters change (which ones and their weights), all others stay loaded at weight 0; "
            f"median over {steps} steps after 2 warm-up steps, ours and diffusers interleaved each step.",
            "Equal work: after the last step both UNets run one input (batch 1, 8x8 latents, 8 tokens) and "
            'must agree within 1e-4 (asserted); "LoRA effect" is how far that output is from the base UNet\'s.',
        ],
        command=common.command("bench.switch_weights", argv if argv is not None else []),
    )


def main(argv: list[str] | None = None) -> common.Result:
    def options(p):
        p.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50], help="numbers of adapters loaded")
        p.add_argument("--steps", type=int, default=None, help="timed steps per K (default 20, tiny 6)")

    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
