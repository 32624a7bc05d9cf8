"""Unfused forward with N = 1, 2, 4, 8 adapters on the attention layers: our stacked op vs PEFT's loop.

Per SD1.5 attention Linear shape (batch 2 with classifier-free guidance at 512x512: 4096, 1024, 256
tokens at widths 320, 640, 1280; cross-attention to_k/to_v read 77 text tokens), one layer is timed three
ways on identical weights and factors: the base ``nn.Linear``; ours (the layer patched by the runtime's
``PatchedLayer``: one shrink and one expand of rank ``N * r``); PEFT (``LoraConfig`` with N adapters all
active: two matmuls, a scale and an add per adapter). The last row sums the shapes weighted by how many of
the UNet's 128 attention layers have each shape. GPU kernel figures: ``python -m bench.gpu``.

    python -m bench.kernels [--tiny] [--no-write] [--repeats 10]
"""

from __future__ import annotations

import torch

from bench import common
from lora_composer.runtime.layer import PatchedLayer
from lora_composer.runtime.mixing import MixingState

NAME = "kernels"
RANK = 16
NS = (1, 2, 4, 8)
COLUMNS = [
    "layer (in -> out, tokens)",
    "adapters",
    "base (ms)",
    "ours (ms)",
    "PEFT (ms)",
    "ours overhead",
    "PEFT overhead",
    "PEFT / ours (LoRA part)",
    "max abs diff",
]


def _shapes(tiny: bool):
    if tiny:
        return [(32, 32, 64, 4), (32, 64, 16, 4)]
    # self-attention: to_q, to_k, to_v, to_out.0 (4 per block); cross-attention: to_q, to_out.0 at the
    # width and to_k, to_v from 768 text features. Blocks per width: 320: 5, 640: 5, 1280: 6 (incl. mid)
    out = []
    for width, tokens, blocks in ((320, 4096, 5), (640, 1024, 5), (1280, 256, 6)):
        out.append((width, width, tokens, blocks * 6))  # 4 self + 2 cross at the width
        out.append((768, width, 77, blocks * 2))
    return out


def run(tiny: bool = False, repeats: int | None = None, argv=None) -> common.Result:
    repeats = repeats or (3 if tiny else 10)
    rows, totals = [], {n: [0.0, 0.0, 0.0] for n in NS}
    for fan_in, fan_out, tokens, count in _shapes(tiny):
        gen = torch.Generator().manual_seed(fan_in * 7 + fan_out)
        x = torch.randn(2, tokens, fan_in, generator=gen)
        lin = torch.nn.Linear(fan_in, fan_out).requires_grad_(False)
        for n in NS:
            factors = [
                (
                    torch.randn(RANK, fan_in, generator=gen) / fan_in**0.5,
                    torch.randn(fan_out, RANK, generator=gen) * 0.05,
                )
                for _ in range(n)
            ]
            ours = torch.nn.Linear(fan_in, fan_out).requires_grad_(False)
            ours.load_state_dict(lin.state_dict())
            mixer = MixingState(n)
            layer = PatchedLayer(ours, mixer)
            for i, (d, u) in enumerate(factors):
                layer.add(i, d, u, 1.0)
            mixer.set(torch.ones(n))
            host = common.peft_linear(lin, factors)
            with torch.no_grad():
                diff = float((ours(x) - host(x)).abs().max())
                tb = common.time_ms(lambda: lin(x), repeats)
                to = common.time_ms(lambda: ours(x), repeats)
                tp = common.time_ms(lambda: host(x), repeats)
            totals[n][0] += count * tb
            totals[n][1] += count * to
            totals[n][2] += count * tp
            rows.append(
                {
                    "layer (in -> out, tokens)": f"{fan_in} -> {fan_out}, {tokens} x2",
                    "adapters": n,
                    "base (ms)": tb,
                    "ours (ms)": to,
                    "PEFT (ms)": tp,
                    "ours overhead": to / tb,
                    "PEFT overhead": tp / tb,
                    "PEFT / ours (LoRA part)": (tp - tb) / max(to - tb, 1e-9),
                    "max abs diff": diff,
                }
            )
            common.log(f"[{NAME}] {fan_in}->{fan_out} x{tokens} N={n}: base {tb:.2f} ms, ours {to:.2f}, PEFT {tp:.2f}")
    for n in NS:
        tb, to, tp = totals[n]
        rows.append(
            {
                "layer (in -> out, tokens)": "**all attention layers of one UNet call**",
                "adapters": n,
                "base (ms)": tb,
                "ours (ms)": to,
                "PEFT (ms)": tp,
                "ours overhead": to / tb,
                "PEFT overhead": tp / tb,
                "PEFT / ours (LoRA part)": (tp - tb) / max(to - tb, 1e-9),
                "max abs diff": "",
            }
        )
    at8 = totals[8]
    notes = [
        f"With 8 rank-{RANK} adapters the attention layers of one UNet call take {at8[1] / at8[0]:.2f}x the base "
        f"with ours and {at8[2] / at8[0]:.2f}x with PEFT's loop (CPU, fp32).",
        "GPU figures (Triton kernels vs the base GEMM for SD1.5, SDXL and FLUX shapes; a denoiser step with 5 "
        "adapters unfused; the CUDA run of the kernel tests) are `python -m bench.gpu`'s section.",
    ]
    return common.Result(
        name=NAME,
        title="Unfused multi-adapter forward on the attention layers" + (" (tiny smoke run)" if tiny else ""),
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            f"One Linear layer per SD1.5 attention shape, fp32, batch 2, no grad; N rank-{RANK} adapters with random "
            "factors at weight 1, identical for both. Ours: `PatchedLayer` (forward hook, stacked factors, torch path "
            "of `lora_composer.kernels.stacked_delta` on the CPU). PEFT: `inject_adapter_in_model(LoraConfig(...))` N times, all "
            "adapters active via `set_adapter`. Medians of the repeats after one warm-up call.",
            '"overhead" is time / base time; "PEFT / ours (LoRA part)" compares the time each adds on top of the base.',
        ],
        command=common.command("bench.kernels", argv if argv is not None else []),
    )


def main(argv: list[str] | None = None) -> common.Result:
    def options(p):
        p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 10, tiny 3)")

    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
