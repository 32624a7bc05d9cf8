"""GPU: the stacked-delta kernels vs the base GEMM, and one denoiser step with 5 adapters unfused.

1. Per Linear shape of SD1.5 (512x512, batch 2), SDXL (1024x1024, batch 2) and FLUX (1024x1024, batch 1),
   with N = 1, 2, 4, 8 rank-16 adapters: the base GEMM ``x W^T``; ours (``lora_composer.kernels.stacked_delta``: the
   Triton shrink/expand kernels, adding into the base output); PEFT's loop (two matmuls, a scale and an
   add per adapter, PEFT's own ``LoraConfig`` layer). Times from CUDA events, medians.
2. One SD1.5-shaped UNet step (fp16, batch 2, 64x64 latents, 77 tokens): the base, ours with 5 rank-16
   adapters unfused on the attention layers, PEFT with the same 5 (``set_adapters``). Goal: ours at most
   1.10x the base.
3. ``tests/test_kernels_triton.py`` on CUDA (compiled, autotuned kernels), pass/fail counts recorded.

    python -m bench.gpu [--tiny] [--no-write] [--repeats 50]

Without a GPU it measures nothing and writes its section saying so; ``--tiny`` runs the same code on the
CPU with small shapes and the torch backend (the smoke run the test suite uses).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from bench import common
from lora_composer.runtime import LoraRuntime
from lora_composer.runtime.layer import PatchedLayer
from lora_composer.runtime.mixing import MixingState
from lora_composer.kernels.lora_ops import stacked_delta, stacked_delta_torch

NAME = "gpu"
RANK = 16
NS = (1, 2, 4, 8)
STEP_ADAPTERS = 5
COLUMNS = [
    "model",
    "layer (in -> out, tokens)",
    "adapters",
    "base GEMM (ms)",
    "ours delta (ms)",
    "PEFT LoRA part (ms)",
    "ours / base",
    "PEFT / base",
    "max abs diff vs torch",
]
STEP_COLUMNS = [
    "denoiser step",
    "adapters",
    "base (ms)",
    "ours unfused (ms)",
    "PEFT unfused (ms)",
    "ours / base",
    "PEFT / base",
]

# (model, in, out, tokens per row, rows): attention projections, cross-attention from the text features,
# feed-forward in and out; FLUX's joint blocks (image tokens) and single blocks (image + text tokens)
SHAPES = [
    ("SD1.5", 320, 320, 4096, 2),
    ("SD1.5", 768, 320, 77, 2),
    ("SD1.5", 320, 2560, 4096, 2),
    ("SD1.5", 1280, 320, 4096, 2),
    ("SD1.5", 640, 640, 1024, 2),
    ("SD1.5", 1280, 1280, 256, 2),
    ("SDXL", 640, 640, 4096, 2),
    ("SDXL", 2048, 640, 77, 2),
    ("SDXL", 640, 5120, 4096, 2),
    ("SDXL", 1280, 1280, 1024, 2),
    ("SDXL", 2048, 1280, 77, 2),
    ("SDXL", 5120, 1280, 1024, 2),
    ("FLUX", 3072, 9216, 4096, 1),
    ("FLUX", 3072, 3072, 4096, 1),
    ("FLUX", 3072, 12288, 4096, 1),
    ("FLUX", 12288, 3072, 4096, 1),
    ("FLUX", 3072, 21504, 4608, 1),
    ("FLUX", 15360, 3072, 4608, 1),
]
TINY_SHAPES = [("tiny", 32, 48, 64, 2), ("tiny", 40, 24, 16, 1)]


def _dtype(model: str, device: str) -> torch.dtype:
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if model == "FLUX" else torch.float16


def _timer(device: str, repeats: int):
    """Median milliseconds of ``fn()``: CUDA events on the GPU, wall time on the CPU."""

    def time_cuda(fn) -> float:
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return common.median_ms(samples)

    return time_cuda if device == "cuda" else lambda fn: common.time_ms(fn, repeats)


def shape_rows(device: str, tiny: bool, repeats: int) -> list[dict]:
    import torch.nn.functional as F

    rows = []
    time = _timer(device, repeats)
    for model, fan_in, fan_out, tokens, batch in TINY_SHAPES if tiny else SHAPES:
        dtype = _dtype(model, device)
        gen = torch.Generator().manual_seed(fan_in * 7 + fan_out)
        x = torch.randn(batch, tokens, fan_in, generator=gen).to(device, dtype)
        lin = torch.nn.Linear(fan_in, fan_out, bias=False).requires_grad_(False)
        weight = lin.weight.to(device, dtype)
        for n in NS[:2] if tiny else NS:
            factors = [
                (
                    torch.randn(RANK, fan_in, generator=gen) / fan_in**0.5,
                    torch.randn(fan_out, RANK, generator=gen) * 0.05,
                )
                for _ in range(n)
            ]
            ours = torch.nn.Linear(fan_in, fan_out, bias=False).requires_grad_(False)
            ours.weight.data.copy_(lin.weight.data)
            ours.to(device, dtype)
            layer = PatchedLayer(ours, MixingState(n))
            for i, (d, u) in enumerate(factors):
                layer.add(i, d, u, 1.0)
            layer.mixer.set(torch.ones(n))
            scale, runs = layer.refresh()
            peft = common.peft_linear(lin, factors).to(device, dtype)
            with torch.no_grad():
                base_out = F.linear(x, weight)
                got = ours(x).float()
                want = (base_out + stacked_delta_torch(x, layer.down, layer.up, scale, None, runs)).float()
                diff = float((got - want).abs().max())
                out = base_out.clone()
                tb = time(lambda: F.linear(x, weight))
                to = time(lambda: stacked_delta(x, layer.down, layer.up, scale, None, runs, out=out))
                tp = time(lambda: peft(x)) - tb
            rows.append(
                {
                    "model": model,
                    "layer (in -> out, tokens)": f"{fan_in} -> {fan_out}, {tokens} x{batch}",
                    "adapters": n,
                    "base GEMM (ms)": tb,
                    "ours delta (ms)": to,
                    "PEFT LoRA part (ms)": tp,
                    "ours / base": to / tb,
                    "PEFT / base": tp / tb,
                    "max abs diff vs torch": diff,
                }
            )
            common.log(
                f"[{NAME}] {model} {fan_in}->{fan_out} x{tokens} N={n}: base {tb:.3f} ms, ours {to:.3f}, PEFT {tp:.3f}"
            )
    return rows


def step_row(device: str, tiny: bool, repeats: int) -> dict:
    """One denoiser step: base, ours (5 adapters unfused), PEFT (the same 5 via ``set_adapters``)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe, ours_host, label = common.build_models(tiny)
    with common.quiet_diffusers():
        ref = pipe.unet.to(device, dtype)
        ours_host.unet.to(device, dtype)
    shapes = common.target_shapes(ref)
    names = [f"a{i}" for i in range(STEP_ADAPTERS)]
    rt = LoraRuntime(ours_host)
    gen = torch.Generator().manual_seed(0)
    size, tokens = (8, 8) if tiny else (64, 77)
    sample = torch.randn(2, ref.config.in_channels, size, size, generator=gen).to(device, dtype)
    ehs = torch.randn(2, tokens, ref.config.cross_attention_dim, generator=gen).to(device, dtype)
    t = torch.tensor(500, device=device)
    time = _timer(device, repeats)
    call = lambda unet: unet(sample, t, encoder_hidden_states=ehs).sample  # noqa: E731
    with torch.no_grad():
        base = time(lambda: call(ref))
        for i, name in enumerate(names):
            f = common.random_factors(shapes, name, seed=4000 + i, rank=RANK)
            f.alpha = float(RANK)
            rt.add(f.adapter())
            common.add_peft_adapter(ref, f)
        with common.quiet_diffusers():
            ref.to(device, dtype)
        rt.set_weights(unet={n: 1.0 for n in names})
        ref.set_adapters(names, [1.0] * len(names))
        diff = float((call(ours_host.unet).float() - call(ref).float()).abs().max())
        ours = time(lambda: call(ours_host.unet))
        peft = time(lambda: call(ref))
    common.log(f"[{NAME}] step: base {base:.2f} ms, ours {ours:.2f}, PEFT {peft:.2f} (max diff {diff:.2e})")
    return {
        "denoiser step": f"{label}, {'fp16' if dtype is torch.float16 else 'fp32'}, batch 2, {size}x{size}",
        "adapters": f"{STEP_ADAPTERS} x rank {RANK}",
        "base (ms)": base,
        "ours unfused (ms)": ours,
        "PEFT unfused (ms)": peft,
        "ours / base": ours / base,
        "PEFT / base": peft / base,
        "max diff": diff,
    }


def cuda_suite() -> str:
    """``tests/test_kernels_triton.py`` on CUDA: pytest's summary line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_kernels_triton.py", "-k", "cuda"],
        cwd=common.ROOT,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return (lines[-1] if lines else proc.stderr.strip().splitlines()[-1]) + f" (exit {proc.returncode})"


def not_run() -> common.Result:
    """The section written where there is no GPU: what would be measured, and that it was not."""
    models = sorted({m for m, *_ in SHAPES})
    return common.Result(
        name=NAME,
        title="GPU: stacked-delta kernels vs the base GEMM; a denoiser step with 5 adapters unfused",
        columns=["measured", "status"],
        rows=[
            {
                "measured": f"kernel time vs the base GEMM, {len(SHAPES)} Linear shapes of {', '.join(models)}, "
                f"1 to 8 rank-{RANK} adapters",
                "status": "not run: no GPU was available",
            },
            {
                "measured": f"SD1.5-shaped UNet step, {STEP_ADAPTERS} rank-{RANK} adapters unfused, ours and PEFT vs "
                "the base (goal: ours at most 1.10x)",
                "status": "not run: no GPU was available",
            },
            {"measured": "`tests/test_kernels_triton.py` on CUDA", "status": "not run: no GPU was available"},
        ],
        notes=[
            "Run `python -m bench.gpu` on a CUDA machine to fill this section. On the CPU the Triton kernels are "
            "tested in Triton's interpreter against the torch reference (fp32/fp16/bf16, mixed ranks, per-row "
            "scales, shapes that are not multiples of the blocks)."
        ],
        command=common.command("bench.gpu", []),
    )


def run(tiny: bool = False, repeats: int | None = None, argv=None) -> common.Result:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        return not_run()
    repeats = repeats or (3 if tiny else 50)
    rows = shape_rows(device, tiny, repeats)
    step = step_row(device, tiny, max(3, repeats // 5))
    suite = cuda_suite() if device == "cuda" else "not run (CPU smoke run)"
    most = max(r["adapters"] for r in rows)
    worst = max(r["ours / base"] for r in rows if r["adapters"] == most)
    notes = [
        f"Denoiser step ({step['denoiser step']}, {step['adapters']}): "
        + ", ".join(f"{c} {common.fmt(step[c])}" for c in STEP_COLUMNS[2:])
        + f" (max output diff ours vs PEFT {step['max diff']:.2e}). Goal (ours at most 1.10x the base): "
        + (
            ("met" if step["ours / base"] <= 1.10 else "NOT met") + f", {step['ours / base']:.2f}x."
            if device == "cuda"
            else "judged on a GPU only."
        ),
        f"With {most} adapters the worst shape's delta costs {worst:.2f}x its base GEMM.",
        f"`tests/test_kernels_triton.py` on CUDA: {suite}.",
    ]
    return common.Result(
        name=NAME,
        title="GPU: stacked-delta kernels vs the base GEMM; a denoiser step with 5 adapters unfused"
        + (" (tiny smoke run)" if tiny else ""),
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            (
                f"Device: {torch.cuda.get_device_name(0)}; SD1.5 and SDXL shapes in fp16, FLUX in bf16; "
                "times are medians of CUDA-event timings after a warm-up call"
                if device == "cuda"
                else "Device: CPU, fp32, torch backend (smoke run of the code; its times say nothing about a GPU)"
            )
            + f"; rank-{RANK} adapters at weight 1, identical factors for ours and PEFT."
        ],
        command=common.command("bench.gpu", argv if argv is not None else []),
    )


def main(argv: list[str] | None = None) -> common.Result:
    def options(p):
        p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 50, tiny 3)")

    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
