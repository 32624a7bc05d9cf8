"""Adapter kinds beyond LoRA (LoHa, LoKr, DoRA): load time per file and the unfused UNet step, ours vs PEFT's layers.

For each kind one adapter is injected into the reference UNet with PEFT's own config (``LoHaConfig``,
``LoKrConfig``, ``LoraConfig(use_dora=True)``) on the attention projections, given random non-zero
weights, and written to a PEFT-format ``.safetensors`` file; ours loads that file (timed) and attaches it
unfused. The UNet step is timed for both, interleaved, after checking that both compute the same output.

    python -m bench.kinds [--tiny] [--no-write] [--repeats N]
"""

from __future__ import annotations

import gc
import json
import tempfile
from pathlib import Path

import torch

from bench import common
from lora_composer.adapters import load_adapter
from lora_composer.runtime import LoraRuntime

NAME = "kinds"
KINDS = ("loha", "lokr", "dora")
COLUMNS = [
    "kind",
    "file (MB)",
    "load (ms)",
    "base step (ms)",
    "ours unfused (ms)",
    "PEFT (ms)",
    "PEFT / ours",
    "ours / base",
    "max rel diff",
]


def _config(kind: str, rank: int):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(common.TARGETS)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=rank, target_modules=targets), {"r": rank, "alpha": rank}
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=targets), {"r": rank, "alpha": rank}
    return (
        LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, use_dora=True),
        {"r": rank, "lora_alpha": rank, "use_dora": True},
    )


def _randomise(unet, seed: int) -> None:
    """Small non-zero factors (PEFT starts one side at zero, which would time a no-op delta)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if any(s in name for s in ("hada_", "lokr_", "lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def run_kind(kind: str, tiny: bool, repeats: int, folder: Path) -> dict:
    from peft import get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    pipe, ours_host, model_label = common.build_models(tiny)
    inputs = common.small_unet_input(pipe.unet)
    base_out = common.unet_out(ours_host.unet, inputs)
    config, meta = _config(kind, common.RANK)
    inject_adapter_in_model(config, pipe.unet, adapter_name=kind)
    _randomise(pipe.unet, seed=len(kind))
    tensors = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=kind).items()}
    path = folder / f"{kind}.safetensors"
    save_file(
        tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in meta.items()})}
    )
    load_ms = common.time_ms(lambda: load_adapter(path, name=kind), max(3, repeats // 2))

    rt = LoraRuntime(ours_host)
    rt.add(load_adapter(path, name=kind))
    rt.set_weights(unet={kind: 1.0})
    want, got = common.unet_out(pipe.unet, inputs), common.unet_out(ours_host.unet, inputs)
    diff = float((got - want).abs().max() / want.abs().max())
    assert diff < 1e-4, f"{kind}: ours and PEFT differ by {diff:.3g}"
    change = float((want - base_out).abs().max() / base_out.abs().max())
    assert change > 1e-3, f"{kind}: the adapter changes the output by only {change:.3g} (nothing to time)"
    base_t, ours_t, ref_t = [], [], []
    for _ in range(repeats + 1):  # the first round warms up
        rt.set_weights(unet={kind: 0.0})  # a weight of 0 skips the adapter: the base UNet, hooks in place
        base_t.append(common.timed(lambda: common.unet_out(ours_host.unet, inputs)))
        rt.set_weights(unet={kind: 1.0})
        ours_t.append(common.timed(lambda: common.unet_out(ours_host.unet, inputs)))
        ref_t.append(common.timed(lambda: common.unet_out(pipe.unet, inputs)))
    base_ms, ours_ms, ref_ms = (common.median_ms(t[1:]) for t in (base_t, ours_t, ref_t))
    row = {
        "kind": {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}[kind],
        "file (MB)": path.stat().st_size / 2**20,
        "load (ms)": load_ms,
        "base step (ms)": base_ms,
        "ours unfused (ms)": ours_ms,
        "PEFT (ms)": ref_ms,
        "PEFT / ours": ref_ms / ours_ms,
        "ours / base": ours_ms / base_ms,
        "max rel diff": diff,
        "_change": change,
        "_model": model_label,
        "_layers": len(common.target_shapes(ours_host.unet)),
    }
    common.log(
        f"[{NAME}] {kind}: load {load_ms:.0f} ms, ours {ours_ms:.1f} ms, PEFT {ref_ms:.1f} ms, base {base_ms:.1f} ms"
    )
    del rt, pipe, ours_host
    gc.collect()
    return row


def run(tiny: bool = False, repeats: int | None = None, kinds=KINDS, argv: list[str] | None = None) -> common.Result:
    repeats = repeats or (3 if tiny else 7)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_kind(k, tiny, repeats, Path(tmp)) for k in kinds]
    first = rows[0]
    return common.Result(
        name=NAME,
        title="Adapter kinds: load time and unfused UNet step (LoHa, LoKr, DoRA vs PEFT)"
        + (" (tiny smoke run)" if tiny else ""),
        columns=COLUMNS,
        rows=rows,
        notes=[
            "PEFT's LoHa and LoKr layers rebuild the full delta weight on every forward; ours runs LoHa through its "
            "Khatri-Rao factors and LoKr through its Kronecker factors (exact low-rank forms of the same delta) "
            "when they are smaller than the weight, and DoRA as a dense delta computed once against the base "
            "weight when attached (PEFT recomputes the weight norm each forward).",
            '"ours / base" is the unfused cost of one adapter; `fuse=True` (merge) makes it 1.',
        ],
        setup=[
            f"Model: {first['_model']}, fp32, eval, no grad; {first['_layers']} targeted layers (attention "
            f"{', '.join(common.TARGETS)}); one adapter of each kind, rank {common.RANK}, random non-zero weights, "
            "written by PEFT (`get_peft_model_state_dict`) and read back by `load_adapter` (load: median of its calls).",
            f"Step: one UNet call, batch 1, 8x8 latents, 8 tokens; medians of {repeats} calls after a warm-up, "
            "base (our UNet with the adapter at weight 0, which skips it), ours and PEFT interleaved.",
        ],
        command=common.command("bench.kinds", argv if argv is not None else []),
    )


def main(argv: list[str] | None = None) -> common.Result:
    def options(p):
        p.add_argument("--repeats", type=int, default=None, help="timed UNet calls per runtime (default 7, tiny 3)")

    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
