"""A batch of requests with different LoRA sets: every row on every live adapter's columns, or each row on its own.

``compose serve`` batches requests that name different LoRAs: one denoiser pass carries every request's rows and
the mixing tensor gives each row its own weights. Computed densely, each row multiplies by every live adapter's
rank columns (zero-weighted for the other requests' adapters); grouped by their live adapters (punica's
segmented idea on whole rows), each group of rows multiplies by its own columns only. One layer call at
SD1.5's shapes (and the mini world's), ``--requests`` requests of ``--per-request`` rank-``--rank`` LoRAs each,
two rows per request (classifier-free guidance), torch path; both must agree (max difference reported). The
runtime groups rows only where the multiply-adds saved pay for the extra calls
(``PatchedLayer.GROUP_MIN_MACS``), so the small layers of the mini world stay dense.

    python -m bench.row_groups [--tiny] [--no-write] [--requests 8] [--per-request 3] [--rank 16] [--repeats 5]
"""

from __future__ import annotations

import torch

from bench import common
from lora_composer.kernels import lora_ops
from lora_composer.runtime.layer import PatchedLayer

NAME = "row_groups"
COLUMNS = [
    "layer",
    "positions",
    "dense (ms)",
    "grouped (ms)",
    "speedup",
    "multiply-adds saved",
    "runtime groups",
    "max abs diff",
]
LAYERS = (  # name, channels in, out, positions per row, kernel (None: Linear)
    ("SD1.5 attention 320, 64x64", 320, 320, 4096, None),
    ("SD1.5 attention 640, 32x32", 640, 640, 1024, None),
    ("SD1.5 attention 1280, 16x16", 1280, 1280, 256, None),
    ("SD1.5 ResNet conv 320, 64x64", 320, 320, 4096, 3),
    ("mini world attention 64, 16x16", 64, 64, 256, None),
    ("mini world ResNet conv 64, 8x8", 64, 64, 64, 3),
)


def _case(cin, cout, positions, kernel, requests, per, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    columns = requests * per * rank
    rows = 2 * requests
    scale = torch.zeros(rows, columns)
    groups = []
    for q in range(requests):
        idx = torch.arange(2 * q, 2 * q + 2)
        a, b = q * per * rank, (q + 1) * per * rank
        scale[idx, a:b] = torch.rand(1, b - a, generator=gen) + 0.5
        groups.append((idx, [(a, b)]))
    if kernel is None:
        down = torch.randn(columns, cin, generator=gen) / cin**0.5
        up = torch.randn(cout, columns, generator=gen) / columns**0.5
        x = torch.randn(rows, positions, cin, generator=gen)
        conv = None
    else:
        side = int(positions**0.5)
        down = torch.randn(columns, cin, kernel, kernel, generator=gen) / (cin * kernel * kernel) ** 0.5
        up = torch.randn(cout, columns, 1, 1, generator=gen) / columns**0.5
        x = torch.randn(rows, cin, side, side, generator=gen)
        conv = {"stride": 1, "padding": kernel // 2, "dilation": 1}
    return x, down, up, scale, conv, groups


def run(tiny: bool, argv: list[str], requests: int, per_request: int, rank: int, repeats: int):
    layers = LAYERS[-2:] if tiny else LAYERS
    if tiny:
        requests, repeats = min(requests, 3), 1
    rows = []
    for name, cin, cout, positions, kernel in layers:
        x, down, up, scale, conv, groups = _case(cin, cout, positions, kernel, requests, per_request, rank)
        runs = [(0, down.shape[0])]
        dense_out = lora_ops.stacked_delta(x, down, up, scale, conv, runs, backend="torch")
        grouped_out = lora_ops.stacked_delta(x, down, up, scale, conv, runs, backend="torch", row_runs=groups)
        dense = common.time_ms(lambda: lora_ops.stacked_delta(x, down, up, scale, conv, runs, backend="torch"), repeats)
        grouped = common.time_ms(
            lambda: lora_ops.stacked_delta(x, down, up, scale, conv, runs, backend="torch", row_runs=groups), repeats
        )
        per_column = positions * (down[0].numel() + cout)
        saved = per_column * (scale.shape[0] * down.shape[0] - sum(len(r) * (b - a) for r, [(a, b)] in groups))
        threshold = len(groups) * PatchedLayer.GROUP_MIN_MACS["conv" if conv else "linear"]
        rows.append(
            {
                "layer": name,
                "positions": positions,
                "dense (ms)": dense,
                "grouped (ms)": grouped,
                "speedup": dense / grouped,
                "multiply-adds saved": f"{saved:.1e}",
                "runtime groups": saved >= threshold,
                "max abs diff": float((dense_out - grouped_out).abs().max()),
            }
        )
        common.log(f"[{NAME}] {rows[-1]}")
    notes = [
        "'runtime groups': whether the runtime takes the grouped path for this layer (the multiply-adds saved "
        "exceed PatchedLayer.GROUP_MIN_MACS per group of rows). The Triton path (CUDA) computes every live "
        "column for every row; grouping is the torch path's."
    ]
    return common.Result(
        name=NAME,
        title="Rows with different LoRA sets: dense vs grouped by adapter",
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            f"{requests} requests x {per_request} rank-{rank} LoRAs, 2 rows each (classifier-free guidance); one "
            f"layer call, fp32, median of {repeats}"
        ],
        command=common.command(f"bench.{NAME}", argv),
    )


def options(parser) -> None:
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)


def main(argv: list[str] | None = None):
    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
