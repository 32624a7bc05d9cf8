"""Attaching many adapters, and merge's step time: what serving many LoRAs on one model costs.

Attach: K random rank-``--rank`` LoRAs (the attention projections of every transformer block) are attached
one after another; for each K in ``--ks`` the mean time of attaches K/2+1..K is reported (amortised: each such
window holds one capacity doubling). Ours: ``LoraRuntime.add``
of a parsed adapter (what the adapter cache hands the server), into stacks that grow by doubling their
capacity. Reference: diffusers' ``pipe.load_lora_weights(state_dict, adapter_name=...)`` of the same factors
(an in-memory PEFT state dict: no file read on either side), which injects one PEFT module per adapter and layer.

Merge: one denoiser step (the UNet at batch 2, classifier-free guidance's rows) of the base model, of three
LoRAs merged unfused (the per-step low-rank path), and fused (``fuse()``: the deltas folded into the weights,
what ``ComposerPipeline(fuse="auto")`` picks when the step count pays for the fold); after ``unfuse()`` the
weights must equal the base bit for bit (asserted).

    python -m bench.attach [--tiny] [--no-write] [--ks 1 10 25 50 100] [--rank 16] [--ref-max-k 100]
"""

from __future__ import annotations

import gc

import torch

from bench import common
from lora_composer.runtime import LoraRuntime

NAME = "attach"
COLUMNS = ["K (adapters attached)", "ours attach (ms)", "ours vs K=1", "diffusers load_lora_weights (ms)",
           "diffusers vs K=1", "speedup"]
STEP_COLUMNS = ["denoiser step", "ms", "vs base"]
MERGED = (1.0, 0.7, 0.5)


def _state_dict(factors: common.Factors) -> dict[str, torch.Tensor]:
    """The factors as a diffusers/PEFT LoRA state dict (``unet.PATH.lora_A.weight``...)."""
    sd = {}
    for path, (down, up) in factors.layers.items():
        sd[f"unet.{path}.lora_A.weight"] = down
        sd[f"unet.{path}.lora_B.weight"] = up
    return sd


def _attach_times(tiny: bool, ks: list[int], rank: int, ref_max_k: int) -> tuple[list[dict], str, int]:
    pipe, ours, label = common.build_models(tiny)
    shapes = common.target_shapes(ours.unet)
    rt = LoraRuntime(ours)
    top = max(ks)
    ours_ms, ref_ms = {}, {}
    for k in range(1, top + 1):
        f = common.random_factors(shapes, f"a{k}", seed=5000 + k, rank=rank)
        adapter = f.adapter()
        ours_ms[k] = common.timed(lambda: rt.add(adapter)) * 1e3
        if k <= ref_max_k:
            sd = _state_dict(f)
            with common.quiet_diffusers():
                ref_ms[k] = common.timed(lambda: pipe.load_lora_weights(sd, adapter_name=f"a{k}")) * 1e3
        if k in ks:
            common.log(f"[{NAME}] K={k}: ours {ours_ms[k]:.1f} ms, diffusers {ref_ms.get(k, float('nan')):.1f} ms")
        del f, adapter
    def window(ms: dict[int, float], k: int) -> float:
        """Mean attach time of adapters K/2+1..K: amortised, each window holds one capacity doubling."""
        picked = [ms[i] for i in range(k // 2 + 1, k + 1)]
        return sum(picked) / len(picked)

    rows = []
    for k in ks:
        ours_k = window(ours_ms, k)
        row = {"K (adapters attached)": k, "ours attach (ms)": ours_k, "ours vs K=1": ours_k / ours_ms[1]}
        if k in ref_ms:
            ref_k = window(ref_ms, k)
            row.update({"diffusers load_lora_weights (ms)": ref_k, "diffusers vs K=1": ref_k / ref_ms[1],
                        "speedup": ref_k / ours_k})
        else:
            row.update({"diffusers load_lora_weights (ms)": "-", "diffusers vs K=1": "-", "speedup": "-"})
        rows.append(row)
    n_layers = len(shapes)
    del pipe, ours, rt
    gc.collect()
    return rows, label, n_layers


def _step_times(tiny: bool, rank: int, repeats: int, latent: int) -> tuple[list[dict], bool]:
    _, ours, _ = common.build_models(tiny)
    unet = ours.unet
    shapes = common.target_shapes(unet)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=gen)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    inputs = (sample, torch.tensor(500), ehs)

    def step():
        common.unet_out(unet, inputs)

    base_ms = common.time_ms(step, repeats)
    rt = LoraRuntime(ours)
    names = [f"m{i}" for i in range(len(MERGED))]
    for i, name in enumerate(names):
        rt.add(common.random_factors(shapes, name, seed=7000 + i, rank=rank).adapter())
    rt.set_weights(unet=dict(zip(names, MERGED)))
    unfused_ms = common.time_ms(step, repeats)
    fuse_ms = common.timed(rt.fuse) * 1e3
    fused_ms = common.time_ms(step, repeats)
    unfuse_ms = common.timed(rt.unfuse) * 1e3
    exact = all(torch.equal(p, base[n]) for n, p in unet.named_parameters())
    assert exact, "unfuse did not restore the base weights bit-exactly"
    rows = [
        {"denoiser step": "base (no LoRA)", "ms": base_ms, "vs base": 1.0},
        {"denoiser step": f"merge, {len(names)} LoRAs, unfused", "ms": unfused_ms, "vs base": unfused_ms / base_ms},
        {"denoiser step": f"merge, {len(names)} LoRAs, fused", "ms": fused_ms, "vs base": fused_ms / base_ms},
        {"denoiser step": "fuse (once per render)", "ms": fuse_ms, "vs base": fuse_ms / base_ms},
        {"denoiser step": "unfuse (once per render)", "ms": unfuse_ms, "vs base": unfuse_ms / base_ms},
    ]
    return rows, exact


def run(tiny: bool, argv: list[str], ks: list[int], rank: int, ref_max_k: int, repeats: int, latent: int):
    ks = sorted(set(ks) | {1})
    rows, label, n_layers = _attach_times(tiny, ks, rank, ref_max_k)
    step_rows, exact = _step_times(tiny, rank, repeats, latent)
    at = {r["K (adapters attached)"]: r for r in rows}
    mid = 50 if 50 in at else ks[len(ks) // 2]
    fused = step_rows[2]["vs base"]
    notes = [
        f"Attach time per adapter around the K-th (mean of attaches K/2+1..K), K=1..{max(ks)}: ours at K={mid} is {at[mid]['ours vs K=1']:.2f}x its K=1 "
        "time (each layer's stack doubles its capacity when full, so an attach writes its own factors and "
        "copies the others O(log K) times in all).",
        "",
        "| " + " | ".join(STEP_COLUMNS) + " |\n|" + "---|" * len(STEP_COLUMNS) + "\n" + "\n".join(
            "| " + " | ".join(common.fmt(r[c]) for c in STEP_COLUMNS) + " |" for r in step_rows),
        "",
        f"Merge fused runs at {fused:.3f}x the base step (the deltas are in the weights: no per-step work); "
        f"after unfuse the weights equal the base bit for bit: {common.fmt(exact)}.",
    ]
    return common.Result(
        name=NAME,
        title="Attaching many adapters; merge fused vs the base step",
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[f"Model: {label}; {n_layers} targeted layers (attention q/k/v/out), rank-{rank} LoRAs",
               f"Merge step: UNet forward at batch 2, {latent}x{latent} latents, 77 tokens; median of {repeats}"],
        command=common.command(f"bench.{NAME}", argv),
    )


def options(parser) -> None:
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 75, 100])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ref-max-k", type=int, default=100, help="stop the diffusers reference after this many")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32, help="latent side of the merge step (32: 256x256 pixels)")


def main(argv: list[str] | None = None):
    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
