"""``compose grid``: AUTOMATIC1111's X/Y/Z plot, one labelled PNG per Z value.

    compose grid --prompt "a purple star" --lora purple-colour --x "weight:star-shape=0.4,0.7,1.0" \\
        --y "strategy=merge,regional" --z "seed=1,2" --out grid.png

An axis is ``KIND=V1,V2,...`` with KIND one of :data:`AXES` (``weight:LORA`` sweeps one LoRA's weight, text
encoder and denoiser alike; 0 leaves it out). Every other setting is the base one, as ``compose`` takes it.

The cells run through the server's step-level batcher (:class:`~lora_composer.serving.batcher.Batcher`): cells
of one size and sampler share one denoiser pass per step, each with its own rows in the batch, its own
adapters and weights through the runtime's per-row mixing tensor, its own scheduler, generator and latents,
so each cell is the image it would be alone. A weight axis (or a seed, steps, guidance or strategy axis, for
strategies that plan row groups) costs one pass per step for the whole grid; strategies that cannot share a
batch (``regional``, those that derive adapters of their own) and other samplers run after, cell by cell.
Each grid PNG carries every cell's generation record (:data:`GRID_KEY`) and its first cell's A1111 text.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_composer.errors import ComposerError
from lora_composer.frontends.args import UsageError, command
from lora_composer.vocab import MAX_SEED

AXES = ("weight", "loras", "strategy", "seed", "steps", "guidance", "sampler")
GRID_KEY = "lora-composer-grid"  # the PNG text chunk holding the grid's axes and every cell's record
MAX_CELLS = 400
_TAG_RE = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class Axis:
    """One axis: ``kind`` (of :data:`AXES`), its ``values`` and, for a weight axis, the LoRA it sweeps."""

    kind: str
    values: tuple
    lora: str = ""

    @property
    def name(self) -> str:
        return f"weight:{self.lora}" if self.kind == "weight" else self.kind

    def label(self, value) -> str:
        """How a value reads on the grid: ``star-shape 0.7``, ``merge``, ``seed 3``, ``20 steps``..."""
        if self.kind == "weight":
            return f"{Path(self.lora).stem} {value:g}"
        if self.kind == "loras":
            return " + ".join(f"{Path(n).stem}" + ("" if w == 1 else f" {w:g}") for n, w in value) or "no LoRA"
        if self.kind == "seed":
            return f"seed {value}"
        if self.kind == "steps":
            return f"{value} steps"
        if self.kind == "guidance":
            return f"guidance {value:g}"
        return str(value)

    def to_dict(self) -> dict:
        if self.kind == "loras":
            return {"axis": self.name, "values": [[{"name": n, "weight": w} for n, w in v] for v in self.values]}
        return {"axis": self.name, "values": list(self.values)}


def _number(kind: str, text: str, flag: str):
    try:
        value = int(text) if kind in ("seed", "steps") else float(text)
    except ValueError:
        what = "a whole number" if kind in ("seed", "steps") else "a number"
        raise UsageError(f"{flag}: {kind} value {text!r} is not {what}") from None
    if kind in ("weight", "guidance") and not math.isfinite(value):
        raise UsageError(f"{flag}: {kind} value {text!r} must be a finite number")
    if kind == "seed" and value != -1 and not 0 <= value <= MAX_SEED:
        raise UsageError(f"{flag}: seed {value} must be between 0 and {MAX_SEED} (or -1: random)")
    if kind == "steps" and not 1 <= value <= 1000:
        raise UsageError(f"{flag}: steps {value} must be between 1 and 1000")
    return value


def parse_axis(text: str, flag: str = "--x") -> Axis:
    """``"weight:star-shape=0.4,0.7,1"``, ``"strategy=merge,regional"``, ``"seed=1,2"``... -> :class:`Axis`;
    a seed of -1 is drawn at random here (A1111's meaning). Raises :class:`UsageError` in one line."""
    head, sep, body = (text or "").partition("=")
    kind, _, lora = head.strip().partition(":")
    kind, lora = kind.strip().lower(), lora.strip()
    if not sep or kind not in AXES:
        raise UsageError(
            f"{flag} {text!r}: expected KIND=V1,V2,... with KIND one of "
            "weight:LORA, loras, strategy, seed, steps, guidance, sampler"
        )
    if kind == "weight" and not lora:
        raise UsageError(f"{flag} {text!r}: a weight axis names its LoRA, as in weight:star-shape=0.4,0.7,1")
    if kind != "weight" and lora:
        raise UsageError(f"{flag} {text!r}: only a weight axis names a LoRA ({kind}=V1,V2,...)")
    items = [v.strip() for v in body.split(",")]
    if not any(items) or not all(items):
        raise UsageError(f"{flag} {text!r}: an empty value (give values separated by commas)")
    if kind == "strategy":
        from lora_composer.fusion import available

        known = available()
        for v in items:
            if v not in known:
                raise UsageError(f"{flag}: unknown strategy {v!r}; valid: {', '.join(known)}")
        values = tuple(items)
    elif kind == "sampler":
        values = tuple(items)  # checked against the model's samplers once it is loaded
    elif kind == "loras":  # sets: "star-shape+purple-colour:0.8,star-shape,none"
        values = tuple(_lora_set(v, flag) for v in items)
    else:
        values = tuple(_number(kind, v, flag) for v in items)
        if kind == "seed":
            values = tuple(secrets.randbelow(2**32) if v == -1 else v for v in values)
    return Axis(kind, values, lora)


def _lora_set(text: str, flag: str) -> tuple:
    """``"a+b:0.8"`` -> ``(("a", 1.0), ("b", 0.8))``; ``none`` -> ``()``."""
    if text.lower() == "none":
        return ()
    out = []
    for part in text.split("+"):
        name, _, weight = part.strip().partition(":")
        if not name.strip():
            raise UsageError(f"{flag}: an empty LoRA name in {text!r} (sets are NAME[:W]+NAME[:W], or none)")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise UsageError(f"{flag}: weight {weight.strip()!r} of {name.strip()} is not a number") from None
        if not math.isfinite(w):
            raise UsageError(f"{flag}: weight {weight.strip()!r} of {name.strip()} must be a finite number")
        out.append((name.strip(), w))
    return tuple(out)


def check_axes(axes: dict[str, Axis | None]) -> None:
    """Two axes may not sweep the same setting, and the grid stays under :data:`MAX_CELLS` cells."""
    seen: dict[str, str] = {}
    for flag, axis in axes.items():
        if axis is None:
            continue
        if axis.name in seen:
            raise UsageError(f"{flag} sweeps {axis.name} as {seen[axis.name]} does: one axis per setting")
        seen[axis.name] = flag
    count = math.prod(len(a.values) for a in axes.values() if a is not None)
    if count > MAX_CELLS:
        raise UsageError(f"{count} cells: at most {MAX_CELLS} in one grid")


# -- samplers ------------------------------------------------------------------------------------------
def samplers(scheduler) -> dict[str, type]:
    """``{scheduler class name: class}``: the model's scheduler and the diffusers schedulers compatible with it
    that load here (some need optional packages); EDM ones, another noise parametrisation, left out."""
    out = {type(scheduler).__name__: type(scheduler)}
    for cls in getattr(scheduler, "compatibles", []):
        if cls.__name__.startswith("EDM"):
            continue
        try:
            cls.from_config(scheduler.config)
        except Exception:  # noqa: BLE001 - an optional dependency missing (scipy, torchsde)
            continue
        out[cls.__name__] = cls
    return out


def sampler_class(available: dict[str, type], name: str | None, base: str) -> str:
    """The scheduler class name for a class name or an A1111 sampler name (``Euler a``); ``base`` for none."""
    from lora_composer.pnginfo import sampler_name

    if not name:
        return base
    if name in available:
        return name
    for cls_name in available:
        if sampler_name(cls_name).lower() == str(name).strip().lower():
            return cls_name
    raise ComposerError(
        f"sampler {name!r} is not available for this model (available: "
        + ", ".join(sampler_name(n) for n in available)
        + ")"
    )


# -- cells ---------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One cell: its position, the settings it renders with, and (once run) its image and record."""

    z: int
    y: int
    x: int
    settings: dict
    image: object = None
    record: object = None
    array: object = None
    error: str = ""
    batched_with: int = 0


@dataclass
class Grid:
    """Axes and cells (``cells[z][y][x]``) of one plot."""

    x: Axis | None
    y: Axis | None
    z: Axis | None
    cells: list = field(default_factory=list)

    def flat(self) -> list[Cell]:
        return [c for plane in self.cells for row in plane for c in row]

    @staticmethod
    def _values(axis):
        return axis.values if axis is not None else (None,)


def _retag(prompt: str, resolve, weights: dict[str, float]) -> tuple[str, list[Path]]:
    """A regional prompt keeps its tags where they stand, named by their files; a tag whose file a weight axis
    sweeps gets that weight. Returns the prompt and the tagged files."""
    from lora_composer.prompt_syntax import format_lora_tag, parse_tag_body

    paths: list[Path] = []

    def rename(match: re.Match) -> str:
        ref = parse_tag_body(match.group(1).lower(), match.group(2), where=match.group(0))
        path = Path(resolve(ref.name))
        paths.append(path)
        if str(path) in weights:
            w = weights[str(path)]
            return format_lora_tag(str(path), w, w)
        return format_lora_tag(str(path), ref.te_weight, ref.unet_weight)

    return _TAG_RE.sub(rename, prompt), paths


def plan(base: dict, x: Axis | None, y: Axis | None, z: Axis | None, resolve) -> Grid:
    """The grid's cells: ``base`` (``prompt``, ``negative_prompt``, ``loras`` as ``[(path, te, unet)]``,
    ``strategy``, ``strategy_args``, ``seed``, ``steps``, ``guidance``, ``sampler``, ``width``, ``height``) with
    each axis's value put in; ``resolve(name) -> path`` names a weight axis's LoRA and the prompt's tags."""
    from lora_composer.fusion.registry import STRATEGIES
    from lora_composer.prompt_syntax import has_regions, parse_prompt

    axes = [a for a in (x, y, z) if a is not None]
    swept = {a.lora: str(Path(resolve(a.lora))) for a in axes if a.kind == "weight"}
    for a in axes:  # every set's names resolved before anything loads
        for value in a.values if a.kind == "loras" else ():
            for name, _ in value:
                resolve(name)
    clean, tag_refs = parse_prompt(base["prompt"])
    tagged = [(str(Path(resolve(r.name))), r.te_weight, r.unet_weight) for r in tag_refs]
    grid = Grid(x, y, z)
    for k, zv in enumerate(Grid._values(z)):
        plane = []
        for j, yv in enumerate(Grid._values(y)):
            row = []
            for i, xv in enumerate(Grid._values(x)):
                s = {**base, "loras": list(base["loras"])}
                weights: dict[str, float] = {}
                for axis, value in ((x, xv), (y, yv), (z, zv)):
                    if axis is None:
                        continue
                    if axis.kind == "weight":
                        weights[swept[axis.lora]] = float(value)
                    elif axis.kind == "loras":  # this set instead of the base LoRAs (the prompt's tags stay)
                        s["loras"] = [(Path(resolve(n)), w, w) for n, w in value]
                    elif axis.kind == "strategy":
                        if value != s["strategy"]:
                            s["strategy_args"] = {}  # the base arguments belong to the base strategy
                        s["strategy"] = value
                    else:
                        s[axis.kind] = value
                cls = STRATEGIES.get(s["strategy"])
                if cls is not None and cls.regional and not has_regions(base["prompt"]):
                    raise UsageError(
                        f"strategy {s['strategy']!r} needs a prompt split into regions with BREAK "
                        "(e.g. 'a purple star BREAK a red circle'): add regions or leave it off the axis"
                    )
                if cls is not None and cls.regional:  # the tags act where they stand, each in its region
                    s["prompt"], s["region_loras"] = _retag(base["prompt"], resolve, weights)
                    own = {str(p) for p in s["region_loras"]}
                    loras = [lo for lo in s["loras"] if str(lo[0]) not in own]
                else:
                    s["prompt"], s["region_loras"] = clean, []
                    loras = [*s["loras"], *tagged]
                by_path: dict[str, tuple[float, float]] = {}
                for path, te, unet in loras:  # one per file, the last wins (as in a render)
                    by_path.pop(str(path), None)
                    by_path[str(path)] = (float(te), float(unet))
                for path, w in weights.items():
                    if path not in {str(p) for p in s["region_loras"]}:
                        by_path.pop(path, None)
                        by_path[path] = (w, w)
                s["loras"] = [(Path(p), te, unet) for p, (te, unet) in by_path.items()]
                s["weights"] = weights
                row.append(Cell(k, j, i, s))
            plane.append(row)
        grid.cells.append(plane)
    return grid


def _spec(s: dict, scheduler: str):
    from lora_composer.serving.jobs import RenderSpec

    return RenderSpec(
        prompt=s["prompt"],
        negative_prompt=s.get("negative_prompt") or "",
        loras=[(Path(p), float(unet)) for p, _, unet in s["loras"]],
        text_weights={str(p): float(te) for p, te, unet in s["loras"] if te != unet},
        strategy=s["strategy"],
        strategy_args=dict(s.get("strategy_args") or {}),
        seed=int(s["seed"]),
        steps=int(s["steps"]),
        width=int(s["width"]),
        height=int(s["height"]),
        guidance=float(s["guidance"]),
        scheduler=scheduler,
        region_loras=list(s.get("region_loras") or []),
    )


def run(composer, grid: Grid, progress=None, max_batch: int | None = None, stop=None) -> Grid:
    """Render every cell of ``grid`` with ``composer`` (a :class:`~lora_composer.pipeline.ComposerPipeline`)
    through the step-level batcher: each cell's image, record and float array (``output_type="np"``'s) are set.
    ``progress(done_steps, total_steps)`` is called as steps finish; ``stop()`` returning True cancels the rest.
    The first cell that fails raises :class:`ComposerError` naming it."""
    import io

    from PIL import Image

    from lora_composer.serving.batcher import Batcher
    from lora_composer.serving.residency import Residency

    cells = grid.flat()
    if not cells:
        return grid
    resolve_samplers(composer, grid)
    specs = [_spec(c.settings, c.settings["sampler"]) for c in cells]
    for c in cells:  # what the pipeline refuses, refused before anything runs
        s = c.settings
        composer.check_size(s["height"], s["width"], s["steps"], limits=not s.get("no_limits"))
    batcher = Batcher(
        composer,
        Residency(composer, max_bytes=1 << 62, max_adapters=1 << 16),
        max_queue=len(cells) + 1,
        max_batch=int(max_batch or len(cells)),
    )
    # cells that can share a batch first, grouped by what shapes one (size, sampler): each group one pass per step
    # (a cell that cannot share a batch queued between two that can would split their batch in two)
    order = sorted(range(len(cells)), key=lambda n: (_shares(batcher, specs[n]), specs[n].batch_key()))
    total = sum(s.steps for s in specs)
    jobs: dict[int, object] = {}
    failed = None
    try:

        def submit_all():  # on the worker thread: every cell is queued before the first step
            for n in order:
                jobs[n] = batcher.submit(specs[n])

        batcher.call(submit_all, timeout=600)
        while True:
            done = sum(_steps_done(j) for j in jobs.values())
            if progress is not None:
                progress(done, total)
            failed = next((n for n, j in jobs.items() if j.done and j.status != "done"), None)
            if failed is not None or all(j.done for j in jobs.values()):
                break
            if stop is not None and stop():
                for j in jobs.values():
                    batcher.cancel(j.id)
            time.sleep(0.05)
    finally:
        for j in jobs.values():  # a failed cell ends the grid: the others stop at their next step
            j.cancel.set()
        batcher.close(drain=False)
    if failed is not None:
        where = ", ".join(f"{a.name} {a.label(v)}" for a, v in _position(grid, cells[failed]))
        raise ComposerError(f"cell ({where or 'alone'}): {jobs[failed].error or jobs[failed].status}")
    for n, cell in enumerate(cells):
        job = jobs[n]
        cell.image = Image.open(io.BytesIO(job.png))
        cell.image.load()
        cell.record, cell.array, cell.batched_with = job.record, job.array, job.batched_with
    return grid


def _shares(batcher, spec) -> bool:
    """Whether the batcher runs ``spec`` in a shared batch (it reads a job's spec only)."""
    from lora_composer.serving.jobs import Job

    return batcher._batchable(Job(spec))


def _steps_done(job) -> int:
    if job.done:
        return job.spec.steps
    return max((e.get("step", 0) for e in list(job.events) if e["event"] == "step"), default=0)


def _position(grid: Grid, cell: Cell) -> list:
    out = []
    for axis, index in ((grid.x, cell.x), (grid.y, cell.y), (grid.z, cell.z)):
        if axis is not None:
            out.append((axis, axis.values[index]))
    return out


# -- the picture ---------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def grid_image(grid: Grid, z: int = 0, min_side: int = 192):
    """The plot of one Z value: cells upscaled by a whole factor (nearest neighbour) to at least ``min_side``
    pixels, X values above the columns, Y values left of the rows, the Z value as a title."""
    from PIL import Image, ImageDraw

    plane = grid.cells[z]
    first = plane[0][0].image
    w, h = first.size
    factor = max(1, -(-min_side // max(1, min(w, h))))
    cw, ch = w * factor, h * factor
    font = _font(max(12, min(24, cw // 12)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 8
    xs = [grid.x.label(v) for v in grid.x.values] if grid.x else []
    ys = [grid.y.label(v) for v in grid.y.values] if grid.y else []
    title = grid.z.label(grid.z.values[z]) if grid.z else ""
    line_h = _text_size(probe, "Ag", font)[1] + 4
    left = max((_text_size(probe, t, font)[0] for t in ys), default=0) + 2 * pad if ys else 0
    top = (line_h + 2 * pad if xs else 0) + (line_h + pad if title else 0)
    cols, rows = len(plane[0]), len(plane)
    canvas = Image.new("RGB", (left + cols * cw + (cols - 1) * 2, top + rows * ch + (rows - 1) * 2), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        tw, _ = _text_size(draw, title, font)
        draw.text(((canvas.width - tw) // 2, pad // 2), title, fill="black", font=font)
    for i, text in enumerate(xs):
        tw, _ = _text_size(draw, text, font)
        draw.text((left + i * (cw + 2) + max(0, (cw - tw) // 2), top - line_h - pad), text, fill="black", font=font)
    for j, text in enumerate(ys):
        draw.text((pad, top + j * (ch + 2) + (ch - line_h) // 2), text, fill="black", font=font)
    for j, row in enumerate(plane):
        for i, cell in enumerate(row):
            image = cell.image.convert("RGB")
            if image.size != (w, h):  # another size on an axis: fit it in the cell
                image = image.resize((w, h), Image.NEAREST)
            canvas.paste(image.resize((cw, ch), Image.NEAREST), (left + i * (cw + 2), top + j * (ch + 2)))
    return canvas


def grid_record(grid: Grid, z: int = 0) -> dict:
    """What a grid PNG holds beside its pixels: the axes and every cell's generation record, row by row."""
    plane = grid.cells[z]
    return {
        "x": grid.x.to_dict() if grid.x else None,
        "y": grid.y.to_dict() if grid.y else None,
        "z": {**grid.z.to_dict(), "value": grid.z.values[z]} if grid.z else None,
        "cells": [[{"x": c.x, "y": c.y, "record": c.record.to_dict()} for c in row] for row in plane],
    }


def save_grid(grid: Grid, z: int, path: Path) -> Path:
    """Write the plot of Z value ``z`` to ``path`` with :func:`grid_record` and the first cell's A1111 text."""
    from PIL.PngImagePlugin import PngInfo

    from lora_composer.pnginfo import PARAMETERS_KEY

    info = PngInfo()
    first = grid.cells[z][0][0].record
    info.add_text(PARAMETERS_KEY, first.to_a1111())
    info.add_text(GRID_KEY, json.dumps(grid_record(grid, z)))
    grid_image(grid, z).save(path, format="PNG", pnginfo=info)
    return Path(path)


def out_paths(out: Path, grid: Grid) -> list[Path]:
    """One file per Z value: ``OUT`` alone, else ``OUT-seed-1.png``, ``OUT-seed-2.png``..."""
    if grid.z is None:
        return [out]
    slug = lambda v: re.sub(r"[^A-Za-z0-9.+-]+", "-", str(v)).strip("-") or "value"  # noqa: E731
    return [
        out.with_name(f"{out.stem}-{slug(grid.z.name.replace(':', '-'))}-{slug(v)}{out.suffix}") for v in grid.z.values
    ]


# -- the command ---------------------------------------------------------------------------------------
def build_parser():
    import argparse

    from lora_composer.frontends.args import Parser, add_device_args, add_log_args

    p = Parser(
        prog="compose grid",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render an X/Y/Z plot (AUTOMATIC1111's): one labelled PNG per Z value, every cell's "
        "settings in its metadata. Cells that differ in LoRA weights (and in seed, steps, "
        "guidance or row-group strategies) run as rows of one denoiser batch per step.",
        epilog="axes: KIND=V1,V2,... with KIND one of\n"
        "  weight:LORA   that LoRA's weight (text encoder and denoiser; added if not given)\n"
        "  loras         LoRA sets instead of --lora: NAME[:W]+NAME[:W],...; none: no LoRA\n"
        "  strategy      merge, regional, composite... (compose --help lists them)\n"
        "  seed          seeds (-1: a random one)\n"
        "  steps         denoising steps\n"
        "  guidance      guidance scales\n"
        "  sampler       samplers, by A1111 name (Euler a) or scheduler class\n\n"
        'example: compose grid -p "a purple star" --lora purple-colour '
        '--x "weight:star-shape=0.4,0.7,1" --y "strategy=merge,regional"',
    )
    p.add_argument("--prompt", "-p", required=True, help="the prompt (may contain <lora:name:w> tags)")
    p.add_argument("--negative-prompt", "-n", dest="negative_prompt", default="", help="negative prompt")
    p.add_argument(
        "--lora",
        "-l",
        action="append",
        default=[],
        metavar="PATH_OR_NAME[:WEIGHT]",
        help="a LoRA in every cell, as compose takes it (repeatable)",
    )
    p.add_argument("--x", required=True, metavar="AXIS", help="the columns' axis, e.g. weight:star-shape=0.4,0.7,1")
    p.add_argument("--y", metavar="AXIS", help="the rows' axis, e.g. strategy=merge,regional")
    p.add_argument("--z", metavar="AXIS", help="one PNG per value, e.g. seed=1,2")
    p.add_argument(
        "--model", "-m", metavar="DIR_OR_ID", help="diffusers model folder or Hub id (default: the mini world)"
    )
    p.add_argument("--library", metavar="DIR", help="LoRA folder (default: $LORA_COMPOSER_LIBRARY)")
    p.add_argument("--strategy", default="merge", help="the strategy where no axis sweeps it (default merge)")
    p.add_argument(
        "--strategy-arg",
        dest="strategy_arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of --strategy (repeatable)",
    )
    p.add_argument("--steps", type=int, default=20, metavar="N", help="denoising steps (default 20)")
    p.add_argument(
        "--guidance", "--cfg", dest="guidance", type=float, metavar="G", help="guidance scale (default: the model's)"
    )
    p.add_argument("--seed", type=int, default=-1, metavar="S", help="seed of every cell (default -1: one random seed)")
    p.add_argument("--sampler", metavar="NAME", help="sampler (default: the model's)")
    p.add_argument("--width", type=int, metavar="W", help="image width (default: the model's)")
    p.add_argument("--height", type=int, metavar="H", help="image height (default: the model's)")
    p.add_argument(
        "--max-batch",
        dest="max_batch",
        type=int,
        metavar="N",
        help="at most N cells in one denoiser pass (default: all that can share one)",
    )
    p.add_argument("--no-limits", dest="no_limits", action="store_true", help="render above the pixel x step budget")
    p.add_argument(
        "--out",
        "-o",
        default="grid.png",
        metavar="FILE",
        help="output PNG (default grid.png; with --z, one FILE-AXIS-VALUE.png per value)",
    )
    p.add_argument(
        "--allow-pickle",
        dest="allow_pickle",
        action="store_true",
        help="allow pickle-based LoRA files (.pt/.ckpt/.bin): only files you trust",
    )
    add_log_args(p)
    add_device_args(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _checked(args) -> tuple[dict[str, Axis | None], dict]:
    """Everything a user can get wrong that needs no model, checked in one line each (exit 2, nothing written)."""
    axes = {
        f"--{k}": (parse_axis(getattr(args, k), f"--{k}") if getattr(args, k) is not None else None)
        for k in ("x", "y", "z")
    }
    check_axes(axes)
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance {args.guidance}: must be a finite number")
    if args.seed != -1 and not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed {args.seed}: must be between 0 and {MAX_SEED} (or -1: random)")
    for key in ("width", "height"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UsageError(f"--{key} {value}: must be a positive number of pixels")
    if args.max_batch is not None and args.max_batch < 1:
        raise UsageError(f"--max-batch {args.max_batch}: must be at least 1")
    from lora_composer.fusion import available

    if args.strategy not in available():
        raise UsageError(f"--strategy {args.strategy}: unknown; valid: {', '.join(available())}")
    strategy_args = {}
    if args.strategy_arg:
        from lora_composer.fusion.registry import parse_strategy_args

        try:
            strategy_args = parse_strategy_args(list(args.strategy_arg))
        except ComposerError as exc:
            raise UsageError(f"--strategy-arg: {exc}") from None
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the output is a PNG, name it .png")
    return axes, strategy_args


@command("compose grid")
def main(argv: list[str]) -> int:
    from lora_composer.default_model import is_default_model, resolve
    from lora_composer.frontends.args import configure_logging, load_pipeline
    from lora_composer.library import resolve_lora
    from lora_composer.prompt_syntax import parse_lora_spec, parse_prompt

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    axes, strategy_args = _checked(args)
    import os

    library = args.library or os.environ.get("LORA_COMPOSER_LIBRARY") or None
    default = args.model is None or is_default_model(args.model)
    model, library = resolve(args.model, library)
    if not default and (os.path.isabs(model) or model.startswith((".", "~"))) and not Path(model).expanduser().exists():
        raise ComposerError(f"model {model} not found")

    def resolve_name(name: str) -> Path:
        return resolve_lora(name, library).resolve()

    try:
        refs = [parse_lora_spec(spec) for spec in args.lora]
    except ComposerError as exc:
        raise UsageError(str(exc)) from None
    parse_prompt(args.prompt)  # an unclosed tag: one line now
    loras = [(resolve_name(r.name), r.te_weight, r.unet_weight) for r in refs]
    base = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "loras": loras,
        "strategy": args.strategy,
        "strategy_args": strategy_args,
        "seed": secrets.randbelow(2**32) if args.seed == -1 else args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "sampler": args.sampler,
        "width": args.width,
        "height": args.height,
        "no_limits": args.no_limits,
    }
    x, y, z = axes["--x"], axes["--y"], axes["--z"]
    grid = plan(base, x, y, z, resolve_name)  # every LoRA name resolved before the model loads
    out = Path(args.out)
    paths = out_paths(out, grid)

    from lora_composer.devices import device_and_dtype

    device, dtype = device_and_dtype(args.device, args.dtype, model)
    composer = load_pipeline(model, library, device=device, dtype=dtype)
    fill_defaults(composer, grid)
    resolve_samplers(composer, grid)  # a sampler this model lacks: one line before anything renders
    for path in {p for c in grid.flat() for p, _, _ in c.settings["loras"]}:
        composer.load_lora(path, allow_pickle=args.allow_pickle)

    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(int(c.settings["steps"]) for c in grid.flat()),
            desc=f"grid of {len(grid.flat())}",
            unit="step",
            file=sys.stderr,
        )

    def progress(done, total):
        if bar is not None:
            bar.update(done - bar.n)

    started = time.perf_counter()
    try:
        run(composer, grid, progress=progress, max_batch=args.max_batch)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    from lora_composer.frontends.cli import _write_atomically

    for k, path in enumerate(paths):
        _write_atomically(path, lambda tmp, k=k: save_grid(grid, k, tmp))
    print(f"wrote {', '.join(str(p) for p in paths)} in {elapsed:.1f} s ({len(grid.flat())} cells)")
    return 0


def resolve_samplers(composer, grid: Grid) -> None:
    """Each cell's sampler as a scheduler class name of this model (the model's own where none is given);
    the compatible schedulers are only built when a cell names another one (building them takes seconds)."""
    base = type(composer.pipe.scheduler).__name__
    available = None
    for c in grid.flat():
        name = c.settings.get("sampler")
        if not name or name == base:
            c.settings["sampler"] = base
            continue
        if available is None:
            available = samplers(composer.pipe.scheduler)
        c.settings["sampler"] = sampler_class(available, name, base)


def fill_defaults(composer, grid: Grid) -> None:
    """The model's own guidance and size where neither the base nor an axis gives one."""
    native = composer.size_rules()[1] or (512, 512)
    for c in grid.flat():
        s = c.settings
        if s.get("guidance") is None:
            s["guidance"] = composer.default_guidance
        s["height"] = int(s.get("height") or native[0])
        s["width"] = int(s.get("width") or native[1])
