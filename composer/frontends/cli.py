"""``compose``: render a prompt with LoRA adapters from the command line.

    compose --prompt "a purple star on a checkered background" --lora star-shape --lora purple-colour --out demo.png
    compose --from-image demo.png --seed 7            # same settings, another seed

The flag form needs no subcommand; the subcommands (``compose index``, ``compose search``, ``compose ui``...)
are the table :data:`COMMANDS`, dispatched on the first argument. The library's errors name Python arguments
(``allow_pickle=True``, ``width=72``); this command names its flags instead (:func:`as_flags`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import secrets
import sys
import time
from pathlib import Path

from lora_composer.errors import ComposerError
from lora_composer.frontends import catalog, convert, evaluate, grid, profile, serve, ui
from lora_composer.frontends.args import (
    Parser,
    UsageError,
    add_device_args,
    add_log_args,
    command,
    configure_logging,
    load_pipeline,
)
from lora_composer.vocab import MAX_SEED

PROG = "compose"


def build_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    sub = "".join(f"\n  {PROG} {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items())
    p = Parser(
        prog=PROG,
        description="Render a prompt with a diffusers text-to-image model and any number of LoRA adapters.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "LoRAs can also be named in the prompt, A1111 style: <lora:NAME>, <lora:NAME:0.8>,\n"
            "<lora:NAME:TE:UNET>. Without --model, the default model (the mini world: trained offline\n"
            "on drawn pictures) and its concept LoRA library are used.\n\n"
            f"subcommands (compose NAME --help for each):{sub}\n\n"
            f"strategies (--strategy NAME), by what each measured on the mini world (docs/EVAL.md):{_strategy_lines()}"
        ),
    )
    p.add_argument("--prompt", "-p", help="the prompt (may contain <lora:name:w> tags)")
    p.add_argument("--negative-prompt", "-n", dest="negative_prompt", help="negative prompt")
    p.add_argument(
        "--lora",
        "-l",
        action="append",
        metavar="PATH_OR_NAME[:WEIGHT]",
        help="a LoRA file or a name in the library; WEIGHT is W or TE:UNET (default 1). Repeat for more.",
    )
    p.add_argument(
        "--loras",
        metavar="auto",
        choices=["auto"],
        help="auto: let the retriever choose LoRAs from the library for the prompt (compose index DIR first, or it indexes on use)",
    )
    p.add_argument(
        "--top-k",
        dest="top_k",
        type=int,
        metavar="K",
        help="with --loras auto: at most K adapters (default 4; a cap, not a target)",
    )
    p.add_argument(
        "--min-score",
        dest="min_score",
        type=float,
        metavar="S",
        help="with --loras auto: one score threshold for every kind of match (default: each kind's calibrated threshold)",
    )
    p.add_argument(
        "--model", "-m", metavar="DIR_OR_ID", help="diffusers model folder or Hub id (default: the mini world model)"
    )
    p.add_argument(
        "--library", metavar="DIR", help="folder of LoRA files to look names up in (default: $LORA_COMPOSER_LIBRARY)"
    )
    p.add_argument("--strategy", help="how adapters are combined: " + ", ".join(_strategies()) + " (default: merge)")
    p.add_argument(
        "--strategy-arg",
        dest="strategy_arg",
        action="append",
        metavar="KEY=VALUE",
        help="a strategy parameter, e.g. --strategy switch --strategy-arg every=3 (repeatable)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="also write OUT.explain.png: heatmaps of the adapter weights applied per step (and per layer group)",
    )
    p.add_argument("--steps", type=int, metavar="N", help="denoising steps (default 20)")
    p.add_argument(
        "--guidance",
        "--cfg",
        dest="guidance",
        type=float,
        metavar="G",
        help="guidance scale (default 7.5; 5 for the mini world model)",
    )
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default, or -1: random, recorded in the PNG)")
    p.add_argument(
        "--width",
        type=int,
        metavar="W",
        help="image width in pixels, a multiple of the model's (default: the model's, 64 for the mini world)",
    )
    p.add_argument(
        "--height",
        type=int,
        metavar="H",
        help="image height in pixels, a multiple of the model's (default: the model's)",
    )
    p.add_argument(
        "--no-limits",
        dest="no_limits",
        action="store_true",
        help="render above the pixel x step budget (4x the model's native size per side at 50 steps): slow, may run out of memory",
    )
    p.add_argument("--out", "-o", metavar="FILE", help="output PNG (default: compose-SEED.png)")
    p.add_argument(
        "--trigger-words",
        dest="trigger_words",
        action="store_true",
        default=None,
        help="append each LoRA's trigger words to the prompt",
    )
    p.add_argument(
        "--dora-scaling",
        dest="dora_scaling",
        choices=("comfy", "peft"),
        default="comfy",
        help="what a DoRA LoRA's weight other than 1 means: comfy (default, ComfyUI's W0 + w (DoRA(W0) - W0)) or peft "
        "(diffusers/PEFT: the weight scales the delta inside the norm); docs/FORMATS.md",
    )
    p.add_argument(
        "--from-image",
        dest="from_image",
        metavar="PNG",
        help="re-render a PNG written by compose (other flags override)",
    )
    p.add_argument(
        "--allow-pickle",
        dest="allow_pickle",
        action="store_true",
        help="allow pickle-based LoRA files (.pt/.ckpt/.bin): they can run code, only use files you trust",
    )
    add_log_args(p)
    add_device_args(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notices")
    return p


# the library's Python arguments -> this command's flags, in its one-line errors
_FLAG_WORDS = [
    (re.compile(r"\b(width|height)=(-?\d+)"), r"--\1 \2"),
    (re.compile(r"\ballow_pickle=True\b"), "--allow-pickle"),
    (re.compile(r"\blimits=False\b"), "--no-limits"),
]


def as_flags(message: str) -> str:
    """A library error as the command line says it: ``allow_pickle=True`` -> ``--allow-pickle``..."""
    for pattern, flag in _FLAG_WORDS:
        message = pattern.sub(flag, message)
    return message


def _resolve_flag(name: str, library):
    """``resolve_lora`` for a ``--lora`` value: a path that is not there reads ``--lora PATH: file not found``."""
    from lora_composer.library import resolve_lora

    try:
        return resolve_lora(name, library)
    except ComposerError as exc:
        if str(exc).startswith(f"{name}: "):
            raise ComposerError(f"--lora {exc}") from None
        raise


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: an error or Ctrl-C leaves no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _note(args, message: str) -> None:
    if not args.quiet:
        print(f"{PROG}: {message}", file=sys.stderr)


def _weights_text(te: float, unet: float) -> str:
    from lora_composer.prompt_syntax import format_weight

    return format_weight(te) if te == unet else f"te {format_weight(te)}/unet {format_weight(unet)}"


def _strategy_lines() -> str:
    import textwrap

    from lora_composer.fusion.registry import AUTO, AUTO_HELP, STRATEGIES

    width = max(len(name) for name in STRATEGIES)
    return (
        "\n"
        + textwrap.fill(
            AUTO_HELP,
            100,
            break_on_hyphens=False,
            initial_indent=f"  {AUTO:<{width}}  ",
            subsequent_indent=" " * (width + 4),
        )
        + "".join(
            "\n"
            + textwrap.fill(
                cls.measured or "-",
                100,
                break_on_hyphens=False,
                initial_indent=f"  {name:<{width}}  ",
                subsequent_indent=" " * (width + 4),
            )
            for name, cls in sorted(STRATEGIES.items())
        )
    )


def _strategies() -> list[str]:
    from lora_composer.fusion.registry import choices

    return choices()


def _settings(args) -> dict:
    """Merge ``--from-image`` settings with the flags given (flags win) and the defaults."""
    from lora_composer.prompt_syntax import parse_lora_spec, parse_prompt

    s = {
        "prompt": None,
        "negative_prompt": "",
        "loras": [],
        "model": None,
        "strategy": "merge",
        "steps": 20,
        "guidance": None,
        "seed": None,
        "width": None,
        "height": None,
        "trigger_words": False,
        "strategy_args": {},
    }
    if args.from_image:
        from lora_composer.pnginfo import read_record

        rec = read_record(args.from_image)
        # The record lists every adapter applied; its prompt may still carry the tags: drop them so
        # nothing is applied twice.
        clean, _ = parse_prompt(rec.prompt)
        s.update(
            prompt=clean,
            negative_prompt=rec.negative_prompt or "",
            model=rec.model or None,
            strategy=rec.strategy or "merge",
            strategy_args=dict(rec.strategy_args or {}),
            steps=rec.steps,
            guidance=rec.guidance_scale,
            seed=rec.seed,
            width=rec.width,
            height=rec.height,
            loras=[
                (
                    lo.get("path") if lo.get("path") and Path(lo["path"]).is_file() else lo["name"],
                    float(lo.get("te_weight", 1.0)),
                    float(lo.get("unet_weight", lo.get("te_weight", 1.0))),
                )
                for lo in rec.loras
            ],
        )
    if args.strategy is not None and args.strategy != s["strategy"]:
        s["strategy_args"] = {}  # recorded arguments belong to the recorded strategy
    for key, value in (
        ("prompt", args.prompt),
        ("negative_prompt", args.negative_prompt),
        ("model", args.model),
        ("strategy", args.strategy),
        ("steps", args.steps),
        ("guidance", args.guidance),
        ("seed", args.seed),
        ("width", args.width),
        ("height", args.height),
        ("trigger_words", args.trigger_words),
    ):
        if value is not None:
            s[key] = value
    if args.strategy_arg:
        from lora_composer.fusion.registry import parse_strategy_args

        try:
            parsed = parse_strategy_args(list(args.strategy_arg))
        except ComposerError as exc:
            raise UsageError(f"--strategy-arg: {exc}") from None
        s["strategy_args"] = {**s["strategy_args"], **parsed}
    if args.lora is not None:
        refs = [parse_lora_spec(spec) for spec in args.lora]
        s["loras"] = [(r.name, r.te_weight, r.unet_weight) for r in refs]
    if s["prompt"] is None:
        raise UsageError("--prompt is required (or --from-image PNG)")
    if s["steps"] < 1:
        raise UsageError("--steps must be at least 1")
    if s["guidance"] is not None and not math.isfinite(s["guidance"]):
        raise UsageError(f"--guidance {s['guidance']}: must be a finite number (the model's default when omitted)")
    if s["seed"] == -1:  # A1111's meaning, as in the web UI: a random seed (the one drawn is recorded)
        s["seed"] = None
    if s["seed"] is not None and not 0 <= s["seed"] <= MAX_SEED:
        raise UsageError(f"--seed {s['seed']}: must be between 0 and {MAX_SEED} (or -1: random)")
    for key in ("width", "height"):  # the model's multiple is checked once it is loaded
        if s[key] is not None and s[key] < 1:
            raise UsageError(f"--{key} {s[key]}: must be a positive number of pixels")
    if s["seed"] is None:
        s["seed"] = secrets.randbelow(2**32)
    return s


def render(args) -> int:
    """Render one image; nothing is written unless it succeeds (the PNG is written whole, then renamed)."""
    from lora_composer.library import resolve_lora
    from lora_composer.prompt_syntax import parse_prompt

    s = _settings(args)
    library = args.library or os.environ.get("LORA_COMPOSER_LIBRARY") or None
    model = s["model"]
    from lora_composer.default_model import is_default_model, resolve

    default = model is None or is_default_model(model)
    model, library = resolve(model, library)
    if default:
        _note(args, f"using the default model (the mini world, offline) {model} with its LoRA library {library}")
    elif (os.path.isabs(model) or model.startswith((".", "~"))) and not Path(model).expanduser().exists():
        raise ComposerError(f"model {model} not found")

    # Resolve every LoRA name (flags and prompt tags) before loading the model: a typo fails at once.
    _, tag_refs = parse_prompt(s["prompt"])
    for ref in tag_refs:
        resolve_lora(ref.name, library)
    loras = [(str(_resolve_flag(name, library)), te, unet) for name, te, unet in s["loras"]]
    if args.loras == "auto" and loras:
        raise UsageError("--loras auto chooses the LoRAs itself: leave out --lora (prompt tags still apply)")
    out = Path(args.out) if args.out else Path.cwd() / f"compose-{s['seed']}.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the output is a PNG, name it .png")

    from lora_composer.devices import device_and_dtype

    device, dtype = device_and_dtype(args.device, args.dtype, model)
    pipe = load_pipeline(model, library, device=device, dtype=dtype)
    pipe.dora_scaling = args.dora_scaling
    try:
        pipe.check_size(s["height"], s["width"], s["steps"], limits=not args.no_limits)  # before any LoRA loads
        for path, _, _ in loras:  # attached once here; the call below reuses them
            pipe.load_lora(path, allow_pickle=args.allow_pickle)

        started = time.perf_counter()
        images = pipe(
            s["prompt"],
            negative_prompt=s["negative_prompt"] or None,
            loras="auto" if args.loras == "auto" else loras,
            strategy=s["strategy"],
            strategy_args=s["strategy_args"] or None,
            num_inference_steps=s["steps"],
            guidance_scale=s["guidance"],
            seed=s["seed"],
            height=s["height"],
            width=s["width"],
            append_trigger_words=bool(s["trigger_words"]),
            progress=not args.quiet,
            allow_pickle=args.allow_pickle,
            limits=not args.no_limits,
            **({"top_k": args.top_k, "min_score": args.min_score} if args.loras == "auto" else {}),
        )
    except ComposerError as exc:  # the library names Python arguments; say the flags
        raise ComposerError(as_flags(str(exc))) from None
    elapsed = time.perf_counter() - started
    record = getattr(pipe, "last_record", None)
    image = images[0]
    from lora_composer.pnginfo import save_png

    if record is not None:
        _write_atomically(out, lambda tmp: save_png(image, tmp, record))
    else:
        _write_atomically(out, lambda tmp: image.save(tmp, format="PNG"))

    explained = ""
    if args.explain and getattr(pipe, "last_driver", None) is not None:
        from lora_composer.explain import save_explanation

        target = out.with_name(out.stem + ".explain.png")
        _write_atomically(
            target,
            lambda tmp: save_explanation(
                pipe.last_driver.history, pipe.last_driver.adapters, tmp, record.strategy if record else ""
            ),
        )
        explained = f"; weights heatmap {target}"
    applied = ", ".join(
        f"{lo['name']} {_weights_text(float(lo['te_weight']), float(lo['unet_weight']))}"
        for lo in (record.loras if record else [])
    )
    size = f"{image.width}x{image.height}"
    if args.loras == "auto":
        picked = getattr(pipe, "last_retrieval", [])
        print(
            "auto LoRAs: "
            + ("; ".join(f"{m.name} {m.weight:g} (score {m.score:.2f}: {m.reason})" for m in picked) or "none matched")
        )
        if getattr(picked, "notice", None):  # the cap dropped a concept the prompt names
            _note(args, f"note: {picked.notice}")
    print(
        f"wrote {out} in {elapsed:.1f} s (seed {s['seed']}, {s['steps']} steps, {size}); LoRAs: {applied or 'none'}{explained}"
    )
    return 0


# name -> (help, command(argv) -> exit code); ``compose NAME ...`` runs it, anything else is the flag form.
COMMANDS = {
    "index": ("index a LoRA folder into its catalog (incremental)", catalog.index),
    "search": ("rank the library's LoRAs for a prompt", catalog.search),
    "train-retriever": ("train the learned weight encoder on the library's described LoRAs", catalog.train),
    "convert": ("convert a LoRA: --to shira --density D (sparse) or --rank R|auto (LoRA-Squeeze)", convert.main),
    "profile": ("score LoRAs' high-frequency energy for --strategy cmlora", profile.main),
    "eval": ("measure every strategy and the retriever on the mini world (ground-truth detectors)", evaluate.main),
    "grid": ('an X/Y/Z plot: --x "weight:LORA=0.4,0.7,1" --y "strategy=merge,regional" [--z "seed=1,2"]', grid.main),
    "ui": ("start the web UI (Gradio) on 127.0.0.1", ui.main),
    "serve": ("serve renders over HTTP (FastAPI), many LoRAs batched per step, on 127.0.0.1", serve.main),
}


@command(PROG)
def _render_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return render(args)


def main(argv: list[str] | None = None) -> int:
    """``compose``: a subcommand from :data:`COMMANDS`, or the flag form (render one image)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][1](argv[1:])
    return _render_command(argv)


if __name__ == "__main__":
    sys.exit(main())
