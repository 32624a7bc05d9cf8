"""Attaching many adapters, and merge's step time: what serving many LoRAs on one model costs.

Attach: K random rank-``--rank`` LoRAs (the attention projections of every transformer block) are attached
one after another; for each K in ``--ks`` the mean time of attaches K/2+1..K is reported (amortised: each such
window holds one capacity doubling). Ours: ``LoraRuntime.add`` of a parsed adapter (what the adapter cache hands
the server), into stacks that grow by doubling their capacity, and again with the stacks reserved for 64
adapters up front (``compose serve``'s residency cap). Reference: diffusers' ``pipe.load_lora_weights(state_dict, adapter_name=...)`` of the same factors
(an in-memory PEFT state dict: no file read on either side), which injects one PEFT module per adapter and layer.

Merge: one denoiser step (the UNet at batch 2, classifier-free guidance's rows) of the base model, of three
LoRAs merged unfused (the per-step low-rank path), and fused (``fuse()``: the deltas folded into the weights,
what ``ComposerPipeline(fuse="auto")`` picks when the step count pays for the fold); after ``unfuse()`` the
weights must equal the base bit for bit (asserted).

    python -m bench.attach [--tiny] [--no-write] [--ks 1 10 25 50 100] [--rank 16] [--ref-max-k 25]
"""

from __future__ import annotations

import functools
import gc
import statistics

import torch

from bench import common
from lora_composer.runtime import LoraRuntime

NAME = "attach"
COLUMNS = [
    "K (adapters attached)",
    "ours, doubling (ms)",
    "vs K=1",
    "ours, reserved for 64 (ms)",
    "vs K=1 ",
    "diffusers load_lora_weights (ms)",
    "vs K=1  ",
    "speedup (reserved)",
]
RESERVE = 64  # compose serve's default residency cap (--max-resident): what the server reserves
STEP_COLUMNS = ["denoiser step", "ms", "vs base"]
MERGED = (1.0, 0.7, 0.5)


def _state_dict(factors: common.Factors) -> dict[str, torch.Tensor]:
    """The factors as a diffusers/PEFT LoRA state dict (``unet.PATH.lora_A.weight``...)."""
    sd = {}
    for path, (down, up) in factors.layers.items():
        sd[f"unet.{path}.lora_A.weight"] = down
        sd[f"unet.{path}.lora_B.weight"] = up
    return sd


def _attach_pass(host, shapes, top: int, rank: int, reserve: int) -> dict[int, float]:
    """Milliseconds of each of ``top`` attaches into one runtime (``reserve``: see ``LoraRuntime``); then clears."""
    first = []
    for _ in range(3):  # K=1 is a single attach: three more, each into an empty runtime, for a median
        rt = LoraRuntime(host, reserve=reserve)
        adapter = common.random_factors(shapes, "a1", seed=5001, rank=rank).adapter()
        first.append(common.timed(functools.partial(rt.add, adapter)) * 1e3)
        rt.clear()
    rt = LoraRuntime(host, reserve=reserve)
    ms = {}
    for k in range(1, top + 1):
        adapter = common.random_factors(shapes, f"a{k}", seed=5000 + k, rank=rank).adapter()
        ms[k] = common.timed(functools.partial(rt.add, adapter)) * 1e3
    rt.clear()
    gc.collect()
    ms[1] = statistics.median(first + [ms[1]])  # with the sequence's own first attach
    return ms


def _attach_times(tiny: bool, ks: list[int], rank: int, ref_max_k: int, reserve: int):
    pipe, ours, label = common.build_models(tiny)
    shapes = common.target_shapes(ours.unet)
    top = max(ks)
    doubling = _attach_pass(ours, shapes, top, rank, reserve=0)
    common.log(f"[{NAME}] doubling: " + ", ".join(f"K={k} {doubling[k]:.1f} ms" for k in ks))
    reserved = _attach_pass(ours, shapes, top, rank, reserve=reserve)
    common.log(f"[{NAME}] reserved for {reserve}: " + ", ".join(f"K={k} {reserved[k]:.1f} ms" for k in ks))
    ref_ms = {}
    for k in range(1, min(top, ref_max_k) + 1):
        sd = _state_dict(common.random_factors(shapes, f"a{k}", seed=5000 + k, rank=rank))
        with common.quiet_diffusers():
            ref_ms[k] = common.timed(functools.partial(pipe.load_lora_weights, sd, adapter_name=f"a{k}")) * 1e3
    common.log(f"[{NAME}] diffusers: " + ", ".join(f"K={k} {ref_ms[k]:.1f} ms" for k in ks if k in ref_ms))

    def window(ms: dict[int, float], k: int) -> float:
        """Mean attach time of adapters K/2+1..K: amortised (with doubling, each window holds one)."""
        picked = [ms[i] for i in range(k // 2 + 1, k + 1)]
        return sum(picked) / len(picked)

    rows = []
    for k in ks:
        ours_k, res_k = window(doubling, k), window(reserved, k)
        row = {
            "K (adapters attached)": k,
            "ours, doubling (ms)": ours_k,
            "vs K=1": ours_k / window(doubling, 1),
            f"ours, reserved for {reserve} (ms)": res_k,
            "vs K=1 ": res_k / window(reserved, 1),
        }
        if k in ref_ms:
            ref_k = window(ref_ms, k)
            row.update(
                {
                    "diffusers load_lora_weights (ms)": ref_k,
                    "vs K=1  ": ref_k / ref_ms[1],
                    "speedup (reserved)": ref_k / res_k,
                }
            )
        else:
            row.update({"diffusers load_lora_weights (ms)": "-", "vs K=1  ": "-", "speedup (reserved)": "-"})
        rows.append(row)
    n_layers = len(shapes)
    del pipe, ours
    gc.collect()
    return rows, label, n_layers


def _step_times(tiny: bool, rank: int, repeats: int, latent: int) -> tuple[list[dict], bool]:
    """Base (the reference pipeline's UNet, no hooks), merged unfused and fused (ours), interleaved per repeat."""
    pipe, ours, _ = common.build_models(tiny)
    unet = ours.unet
    shapes = common.target_shapes(unet)
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=gen)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    inputs = (sample, torch.tensor(500), ehs)
    rt = LoraRuntime(ours)
    names = [f"m{i}" for i in range(len(MERGED))]
    for i, name in enumerate(names):
        rt.add(common.random_factors(shapes, name, seed=7000 + i, rank=rank).adapter())
    rt.set_weights(unet=dict(zip(names, MERGED)))
    times = {"base": [], "unfused": [], "fused": [], "fuse": [], "unfuse": []}
    for i in range(repeats + 1):  # the first round warms up
        got = {
            "base": common.timed(lambda: common.unet_out(pipe.unet, inputs)),
            "unfused": common.timed(lambda: common.unet_out(unet, inputs)),
            "fuse": common.timed(rt.fuse),
        }
        got["fused"] = common.timed(lambda: common.unet_out(unet, inputs))
        got["unfuse"] = common.timed(rt.unfuse)
        if i:
            for key, value in got.items():
                times[key].append(value)
    # the fastest of the repeats: the three run the same arithmetic, and on a shared CPU contention only adds time
    ms = {key: min(v) * 1e3 for key, v in times.items()}
    exact = all(torch.equal(p, base[n]) for n, p in unet.named_parameters())
    assert exact, "unfuse did not restore the base weights bit-exactly"
    rows = [
        {"denoiser step": "base (no LoRA)", "ms": ms["base"], "vs base": 1.0},
        {
            "denoiser step": f"merge, {len(names)} LoRAs, unfused",
            "ms": ms["unfused"],
            "vs base": ms["unfused"] / ms["base"],
        },
        {"denoiser step": f"merge, {len(names)} LoRAs, fused", "ms": ms["fused"], "vs base": ms["fused"] / ms["base"]},
        {"denoiser step": "fuse (once per render)", "ms": ms["fuse"], "vs base": ms["fuse"] / ms["base"]},
        {"denoiser step": "unfuse (once per render)", "ms": ms["unfuse"], "vs base": ms["unfuse"] / ms["base"]},
    ]
    return rows, exact


def run(tiny: bool, argv: list[str], ks: list[int], rank: int, ref_max_k: int, repeats: int, latent: int):
    ks = sorted(set(ks) | {1})
    rows, label, n_layers = _attach_times(tiny, ks, rank, ref_max_k, RESERVE)
    step_rows, exact = _step_times(tiny, rank, repeats, latent)
    at = {r["K (adapters attached)"]: r for r in rows}
    mid = 50 if 50 in at else ks[len(ks) // 2]
    fused = step_rows[2]["vs base"]
    notes = [
        f"Attach time per adapter around the K-th (the mean of attaches K/2+1..K, so each window holds one capacity "
        f"doubling), K=1..{max(ks)}. At K={mid}: {at[mid]['vs K=1']:.2f}x the K=1 time with doubling alone (an attach "
        "writes its own factors; each doubling copies the stack, once per window: about twice the bytes written per "
        f"attach, plus fresh pages), {at[mid]['vs K=1 ']:.2f}x with the stacks reserved for {RESERVE} adapters up "
        "front (`LoraRuntime(pipe, reserve=64)`, what `compose serve` does for its residency cap: on the CPU the "
        "reservation is address space until written, so nothing is copied until the 65th). diffusers' "
        "`load_lora_weights` injects PEFT modules and grows with the number loaded (diffusers #9297).",
        "",
        "| "
        + " | ".join(STEP_COLUMNS)
        + " |\n|"
        + "---|" * len(STEP_COLUMNS)
        + "\n"
        + "\n".join("| " + " | ".join(common.fmt(r[c]) for c in STEP_COLUMNS) + " |" for r in step_rows),
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
        setup=[
            f"Model: {label}; {n_layers} targeted layers (attention q/k/v/out), rank-{rank} LoRAs",
            f"Merge step: UNet forward at batch 2, {latent}x{latent} latents, 77 tokens; base, unfused and fused "
            f"interleaved, the fastest of {repeats} rounds each",
        ],
        command=common.command(f"bench.{NAME}", argv),
    )


def options(parser) -> None:
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 75, 100])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--ref-max-k",
        type=int,
        default=25,
        help="stop the diffusers reference after this many (about 10 s per load at 25 on a 2-core CPU)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32, help="latent side of the merge step (32: 256x256 pixels)")


def main(argv: list[str] | None = None):
    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
