"""Shared pieces of the benchmarks: models, random adapters for both runtimes, timing, the docs table.

Every benchmark runs ours and its diffusers/PEFT reference side by side in one process, interleaved
step by step, on identical base weights and identical LoRA factors, and writes one marked section of
``docs/BENCHMARKS.md`` (replaced on rerun).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import platform
import re
import shlex
import gc
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_composer import tiny
from lora_composer.adapters.types import Adapter, LayerDelta

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "BENCHMARKS.md"
TARGETS = tiny.SD15_TARGETS  # to_q, to_k, to_v, to_out.0
RANK = 8

DOC_HEADER = """# Benchmarks

Each section below is written by one benchmark in `bench/` and replaced when it is rerun
(`python -m bench` runs them all; `--tiny` runs a smoke version on the tiny pipeline, `--no-write`
leaves this file alone). Ours and the diffusers/PEFT reference run in the same process, interleaved
step by step, on identical base weights and identical LoRA factors; times are medians.
"""


# -- models ---------------------------------------------------------------------------------------
def build_sd15_unet(seed: int = 0):
    """SD1.5-shaped UNet2DConditionModel with random weights (859.5 M parameters, fp32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32,
    )
    return unet.eval().requires_grad_(False)


@contextlib.contextmanager
def quiet_diffusers():
    """Silence diffusers' construction/cast notices (safety checker, fp32 modules) inside the block."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def build_models(tiny_mode: bool, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(reference_pipe, our_host, label)``: a diffusers StableDiffusionPipeline for the reference and
    a separate object with an identical ``.unet`` (same weights, cast to ``dtype``) for our runtime.

    The full-size run puts the SD1.5-shaped UNet into a pipeline whose text encoder, VAE and tokenizer
    are the tiny ones (only the UNet is benchmarked; the pipeline gives diffusers' own
    ``set_adapters``/``fuse_lora``/``unfuse_lora`` code paths).
    """
    from diffusers import StableDiffusionPipeline

    with quiet_diffusers():
        small = tiny.build_tiny_sd15_pipeline(seed=seed)
        small.unet.eval().requires_grad_(False)
        if tiny_mode:
            pipe, label = small, "tiny SD1.5-shaped UNet (block_out_channels (32, 64))"
        else:
            unet = build_sd15_unet(seed)
            pipe = StableDiffusionPipeline(**{**small.components, "unet": unet})
            pipe.set_progress_bar_config(disable=True)
            label = "SD1.5-shaped UNet (random weights)"
        pipe.unet.to(dtype)
    n = sum(p.numel() for p in pipe.unet.parameters())
    ours = types.SimpleNamespace(unet=copy.deepcopy(pipe.unet))
    return pipe, ours, f"{label}, {n / 1e6:.1f} M parameters"


def target_modules(unet) -> list[tuple[str, torch.nn.Linear]]:
    return list(tiny._targets(unet, TARGETS))


# -- adapters -------------------------------------------------------------------------------------
@dataclass
class Factors:
    """One random rank-``RANK`` LoRA: ``{module path: (down [r, in], up [out, r])}``, both non-zero."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float = float(RANK)

    def adapter(self) -> Adapter:
        deltas = {f"unet.{path}": LayerDelta(d, u, self.alpha) for path, (d, u) in self.layers.items()}
        return Adapter(self.name, "unknown", deltas)


def target_shapes(unet) -> dict[str, tuple[int, int]]:
    """``{module path: (in, out)}`` of the targeted Linear layers (read before any PEFT injection)."""
    return {path: (mod.in_features, mod.out_features) for path, mod in target_modules(unet)}


def random_factors(
    shapes: dict[str, tuple[int, int]], name: str, seed: int, rank: int = RANK, up_std: float = 0.05
) -> Factors:
    """Down factors ~ N(0, 1/in), up factors ~ N(0, up_std^2): a visible but sane delta."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (fan_in, fan_out) in shapes.items():
        down = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=gen) * up_std
        layers[path] = (down, up)
    return Factors(name, layers)


def add_peft_adapter(unet, factors: Factors) -> None:
    """Inject a PEFT LoRA through diffusers' ``add_adapter`` and copy the given factors into it."""
    from peft import LoraConfig

    if not factors.layers:
        raise ValueError(f"adapter {factors.name} has no layers")
    rank = next(iter(factors.layers.values()))[0].shape[0]
    config = LoraConfig(r=rank, lora_alpha=factors.alpha, target_modules=list(TARGETS), init_lora_weights=False)
    with warnings.catch_warnings():  # "Already found a peft_config": several adapters is the point here
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        unet.add_adapter(config, adapter_name=factors.name)
    modules = dict(unet.named_modules())
    copied = 0
    with torch.no_grad():
        for path, (down, up) in factors.layers.items():
            layer = modules[path]
            layer.lora_A[factors.name].weight.copy_(down)
            layer.lora_B[factors.name].weight.copy_(up)
            copied += 1
    n_lora = sum(1 for m in unet.modules() if hasattr(m, "lora_A") and factors.name in m.lora_A)
    if n_lora != copied:
        raise RuntimeError(f"PEFT patched {n_lora} layers, the adapter has {copied}")


def peft_linear(lin: torch.nn.Linear, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.nn.Module:
    """A copy of ``lin`` with one PEFT LoRA per ``(down, up)`` pair (alpha = rank), all active: PEFT's own layer,
    looping over its adapters. Call the returned module like ``lin``."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = factors[0][0].shape[0]
    host = torch.nn.Sequential(copy.deepcopy(lin))
    names = [f"a{i}" for i in range(len(factors))]
    for name in names:
        host = inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]), host, adapter_name=name
        )
    layer = host[0]
    with torch.no_grad():
        for name, (down, up) in zip(names, factors):
            layer.lora_A[name].weight.copy_(down)
            layer.lora_B[name].weight.copy_(up)
    layer.set_adapter(names)
    return host.requires_grad_(False)


def small_unet_input(unet, seed: int = 0):
    """One small input (batch 1, 8x8 latents, 8 tokens): enough to compare outputs, cheap on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    dtype = unet.dtype
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen).to(dtype)
    ehs = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen).to(dtype)
    return sample, torch.tensor(500), ehs


def unet_out(unet, inputs) -> torch.Tensor:
    sample, t, ehs = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=ehs).sample.float()


# -- timing ---------------------------------------------------------------------------------------
def timed(fn) -> float:
    """Seconds taken by ``fn()``, with Python's garbage collector paused as ``timeit`` does (a full
    collection over diffusers' and PEFT's many objects would otherwise land in random samples)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after one warm-up call (CPU wall time)."""
    fn()
    return median_ms([timed(fn) for _ in range(repeats)])


# -- machine and docs -----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_vm() -> bool:
    try:
        return " hypervisor" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def machine() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    cores = os.cpu_count() or 1
    gpu = f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU (benchmarks run on the CPU)"
    return {
        "machine": f"{cores}-core CPU {'VM' if is_vm() else 'machine'}, {gpu}",
        "cpu": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "versions": (
            f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"peft {peft.__version__}, transformers {transformers.__version__}"
        ),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def command(module: str, argv: list[str]) -> str:
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def fmt(v) -> str:
    """A table cell: floats to 3 significant-ish digits, booleans as yes/NO."""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 0.1:
            return f"{v:.2f}"
        if abs(v) >= 1e-3:
            return f"{v:.4f}"
        return f"{v:.2e}"
    return str(v)


@dataclass
class Result:
    """What one benchmark produced: rows of a table plus the prose around it."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    command: str = ""
    machine: dict[str, str] = field(default_factory=machine)

    def table(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(row[c]) for c in self.columns) + " |")
        return "\n".join(lines)

    def markdown(self) -> str:
        m = self.machine
        parts = [
            f"## {self.title}",
            "",
            f"- Machine: {m['machine']}; CPU: {m['cpu']}; torch threads: {m['threads']}",
            f"- Software: {m['versions']}",
            f"- Date: {m['date']}",
            f"- Command: `{self.command}`",
            *[f"- {s}" for s in self.setup],
            "",
            self.table(),
            "",
            *[f"{n}\n" for n in self.notes],
        ]
        return "\n".join(parts).rstrip() + "\n"

    def print(self) -> None:
        print(self.markdown())


def write_section(name: str, body: str, path: Path = DOCS) -> Path:
    """Replace (or append) the section between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else DOC_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def base_parser(description: str):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="smoke run on the tiny SD1.5-shaped pipeline")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(ROOT)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def report(name: str, result, write: bool):
    """Print a benchmark's tables and, unless ``--no-write``, replace its section of docs/BENCHMARKS.md."""
    result.print()
    if write:
        log(f"[{name}] wrote {write_section(name, result.markdown())}")
    return result


def cli(name: str, doc: str, run, argv: list[str] | None, options=None) -> Result:
    """One benchmark's command line: the shared flags plus its own (``options(parser)``, each ``--flag``
    passed to ``run`` as ``flag=``), then :func:`report`."""
    parser = base_parser(doc.splitlines()[0])
    if options is not None:
        options(parser)
    args = vars(parser.parse_args(argv))
    tiny, write = args.pop("tiny"), not args.pop("no_write")
    apply_threads(args.pop("threads"))
    result = run(tiny=tiny, argv=sys.argv[1:] if argv is None else argv, **args)
    return report(result.name or name, result, write=write)  # a run may name its own section (a variant)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
