"""``compose ui`` / ``python app.py``: a Gradio web UI over :class:`~lora_composer.pipeline.ComposerPipeline`.

    compose ui                                   # the default model (the mini world), http://127.0.0.1:7860
    compose ui --model DIR_OR_ID --library DIR --host 0.0.0.0 --port 8080

The model and the LoRA library are fixed at start-up. The browser only ever names LoRAs by their path
relative to the library (what :func:`library_names` lists); anything else, including absolute paths,
``..`` and symlinks that leave the folder, is refused. Renders go through Gradio's queue and one lock, so
several browsers share one pipeline and each request sets its own adapters.

The page keeps the results beside the controls (in view after Generate on a phone too), shows images whole
(tiny ones upscaled nearest-neighbour), the applied weights as a labelled steps x adapters grid, the
retriever's picks with the prompt span each covers, as many LoRA rows as the user adds (kept in step with the
prompt's ``<lora:name:w>`` tags), the sampler, a Stop button that interrupts at the next step, "PNG info"
(a PNG's A1111 ``parameters`` or our own record restores every setting), and the images made since the page
opened. A user's mistake is shown in the page and logged as one line.
"""

from __future__ import annotations

import html
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
import contextvars
from pathlib import Path

from lora_composer.errors import ComposerError
from lora_composer.library import lora_name
from lora_composer.frontends.args import (
    Parser,
    UsageError,
    add_device_args,
    add_log_args,
    command,
    configure_logging,
    is_loopback,
)
from lora_composer.vocab import LORA_EXTENSIONS, MAX_SEED
from lora_composer.fusion.registry import AUTO, parse_strategy_args, resolve_auto
from lora_composer.frontends import grid as gridmod
from lora_composer.frontends import ui_view

MAX_TOP_K = 8  # the Auto button's "at most" slider
DEFAULT_MAX_UPLOAD_MB = 512
NONE = ""


def _strategy_params(name: str) -> dict:
    from lora_composer.fusion.registry import strategy_params

    try:
        return strategy_params(name)
    except KeyError:
        return {}


def _shown(default) -> str:
    if isinstance(default, (tuple, list)):
        return ",".join(str(v) for v in default)
    return "" if default is None else str(default)


def _param_widget(strategy: str, key: str, default):
    """One widget per strategy parameter, typed by its default; untouched widgets send nothing."""
    import gradio as gr

    elem = f"param-{strategy}-{key}"
    if isinstance(default, bool):
        return gr.Checkbox(value=default, label=key, elem_id=elem)
    if isinstance(default, (int, float)):
        return gr.Number(value=default, precision=0 if isinstance(default, int) else None, label=key, elem_id=elem)
    return gr.Textbox(value=_shown(default), label=key, placeholder="default" if default is None else "", elem_id=elem)


def _args_text(params: list[tuple[str, object]], values) -> str:
    """``KEY=VALUE`` lines for the widgets whose value differs from the parameter's default."""
    lines = []
    for (key, default), value in zip(params, values):
        if isinstance(default, bool) or isinstance(value, bool):
            if bool(value) != bool(default):
                lines.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if value is not None and float(value) != float(default):
                lines.append(f"{key}={int(value) if isinstance(default, int) else float(value)}")
        else:
            text = "" if value is None else str(value).strip()
            if text and text != _shown(default):
                lines.append(f"{key}={text}")
    return "\n".join(lines)


def _args_from_record(args: dict) -> str:
    """A record's strategy arguments as the ``KEY=VALUE`` text the strategy box takes."""
    parts = []
    for key, value in (args or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif value is None:
            value = "none"
        parts.append(f"{key}={_shown(value)}")
    return " ".join(parts)


def _same_model(recorded: str, model: str) -> bool:
    from lora_composer.default_model import MODEL_NAME, is_default_model

    if recorded == MODEL_NAME:
        return is_default_model(model)
    return Path(str(recorded)).name == Path(str(model)).name


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class Stopped(ComposerError):
    """The user pressed Stop: the render ended at a step boundary."""


def log_error(exc: BaseException) -> str:
    """One line on stderr for a user's mistake (a :class:`ComposerError`); a traceback for anything else."""
    msg = _one_line(exc)
    if isinstance(exc, ComposerError):
        print(f"compose ui: {msg}", file=sys.stderr, flush=True)
    else:
        print(f"compose ui: unexpected error: {msg}", file=sys.stderr, flush=True)
        traceback.print_exception(exc, file=sys.stderr)
    return msg


class ComposerUI:
    """The state behind the app: one pipeline, its library, a lock and an output folder."""

    def __init__(
        self,
        model=None,
        library=None,
        out_dir=None,
        max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
        allow_uploads: bool = True,
        uploads_dir=None,
        device: str = "auto",
        dtype: str = "auto",
    ):
        from lora_composer.default_model import resolve
        from lora_composer.pipeline import ComposerPipeline

        self.model, library = resolve(model, library)
        if library is None:
            raise ComposerError("the UI needs a LoRA library folder (--library DIR)")
        self.library = Path(library).expanduser().resolve()
        if not self.library.is_dir():
            raise ComposerError(f"LoRA library {self.library} is not a folder")
        from lora_composer.devices import device_and_dtype

        device, dtype = device_and_dtype(device, dtype, str(self.model))
        self.pipe = ComposerPipeline.from_pretrained(self.model, library=self.library, device=device, torch_dtype=dtype)
        self.default_guidance = self.pipe.default_guidance
        self.lock = threading.Lock()
        # Every pipeline call runs on this one thread: the retriever's SQLite catalog must stay on the thread
        # that opened it, and one thread means one request's adapters at a time.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="composer-ui")
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lora-composer-ui-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_mb) * 2**20
        self.allow_uploads = allow_uploads
        if uploads_dir is None:  # the user's data folder: never the library (it may be the installed package's)
            from lora_composer.cache import data_dir

            uploads_dir = data_dir() / "uploads"
        self.uploads = Path(uploads_dir).expanduser().resolve()
        unet = getattr(self.pipe.pipe, "unet", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", 64) or 64
        self.default_size = int(sample) * int(getattr(self.pipe.pipe, "vae_scale_factor", 8))
        self.base_scheduler = self.pipe.pipe.scheduler
        self.samplers = self._samplers()
        self._stops: dict[str, threading.Event] = {}  # session -> its Stop button's flag
        self.last_errors: dict[str, str] = {}  # session -> its last request's error, shown in place of its output
        self.step = 0  # steps done by the render in progress (tests and the Stop message read it)
        self.last_stop: dict | None = None  # {"requested_at": step, "stopped_at": step, "steps": total}

    def _samplers(self) -> dict[str, type]:
        """``{scheduler class name: class}``: the model's scheduler and the diffusers schedulers compatible
        with it that load here (some need optional packages)."""
        return gridmod.samplers(self.base_scheduler)

    def sampler_choices(self) -> list[tuple[str, str]]:
        """``[(A1111 name, scheduler class name)]`` for a dropdown, the model's own first; the class name is
        shown only where two classes share an A1111 name (a long label is cut in the box)."""
        from collections import Counter

        from lora_composer.pnginfo import sampler_name

        names = list(self.samplers)
        first, rest = names[0], sorted(names[1:], key=lambda n: sampler_name(n).lower())
        shared = Counter(sampler_name(n) for n in names)
        return [
            (f"{sampler_name(n)} ({n})" if shared[sampler_name(n)] > 1 else sampler_name(n), n) for n in [first, *rest]
        ]

    def sampler_class(self, name: str | None) -> str:
        """The scheduler class name for a class name or an A1111 sampler name (``Euler a``)."""
        return gridmod.sampler_class(self.samplers, name, type(self.base_scheduler).__name__)

    # -- stop ---------------------------------------------------------------------------------------
    def stop(self, key: str = "") -> None:
        """Ask the render of session ``key`` to stop at its next step."""
        flag = self._stops.get(key)
        if flag is not None and not flag.is_set():
            self.last_stop = {"requested_at": self.step, "stopped_at": None, "steps": None}
            flag.set()

    def _run(self, fn, *args, **kwargs):
        ctx = contextvars.copy_context()  # gr.Progress and friends read context variables

        def job():
            with self.lock:
                return ctx.run(fn, *args, **kwargs)

        return self._worker.submit(job).result()

    # -- the library, confined ----------------------------------------------------------------------
    def library_files(self) -> dict[str, Path]:
        """``{relative name: resolved path}`` of every adapter file really inside the library, then the
        uploaded ones (``uploads/NAME``, in :attr:`uploads`)."""
        from lora_composer.library import list_loras

        out = {}
        for root, prefix in ((self.library, ""), (self.uploads, "uploads/")):
            if prefix and not (self.allow_uploads and root.is_dir()):
                continue
            for path in list_loras(root):
                real = path.resolve()
                if real.is_file() and real.is_relative_to(root):
                    out.setdefault(prefix + path.relative_to(root).as_posix(), real)
        return out

    def library_names(self) -> list[str]:
        return list(self.library_files())

    def lora_path(self, name: str) -> Path:
        """The file for a name the browser sent; only names inside the library are accepted."""
        text = (name or "").strip()
        files = self.library_files()
        if text in files:
            return files[text]
        if "/" not in text and "\\" not in text and not text.startswith("~"):  # a bare name: match the stem
            stem = text.lower()
            for ext in LORA_EXTENSIONS:
                if stem.endswith(ext):
                    stem = stem[: -len(ext)]
            hits = [p for rel, p in files.items() if lora_name(rel).lower() == stem]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ComposerError(f"LoRA name {text!r} is ambiguous in the library: pick it from the list")
        raise ComposerError(f"LoRA {text!r} is not in the library {self.library} (only its files can be used)")

    def catalog_rows(self, query: str = "") -> list[list]:
        """The library as table rows (name, kind, size MB, trigger words), filtered by ``query``."""
        rows = []
        words, kinds = {}, {}
        try:
            from lora_composer.retriever import Catalog

            with Catalog.for_library(self.library) as cat:
                for row in cat.rows():
                    words[Path(row.path).resolve()] = ", ".join(row.trigger_words)
                    kinds[Path(row.path).resolve()] = row.kinds
        except Exception:  # no catalog yet, or no retriever: names only
            pass
        q = (query or "").strip().lower()
        for name, path in self.library_files().items():
            trig = words.get(path, "")
            if q and q not in name.lower() and q not in trig.lower():
                continue
            rows.append([name, kinds.get(path, ""), round(path.stat().st_size / 2**20, 2), trig])
        return rows

    # -- uploads ----------------------------------------------------------------------------------
    def add_upload(self, file_path: str) -> str:
        """Copy an uploaded ``.safetensors`` file into :attr:`uploads` (the user's data folder, not the
        library); returns its name (``uploads/NAME.safetensors``)."""
        if not self.allow_uploads:
            raise ComposerError("uploads are disabled on this server")
        src = Path(file_path)
        if src.suffix.lower() != ".safetensors":
            raise ComposerError(f"{src.name}: only .safetensors files can be uploaded")
        size = src.stat().st_size
        if size > self.max_upload_bytes:
            raise ComposerError(
                f"{src.name}: {size / 2**20:.1f} MB is over the {self.max_upload_bytes // 2**20} MB limit"
            )
        with open(src, "rb") as fh:
            head = fh.read(8)
        header = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header <= 0 or header + 8 > size:
            raise ComposerError(f"{src.name}: not a safetensors file")
        try:
            from safetensors import safe_open

            with safe_open(str(src), framework="pt") as fh:
                fh.keys()
        except Exception as exc:
            raise ComposerError(f"{src.name}: not a readable safetensors file ({_one_line(exc)})") from None
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem).strip(".-") or "upload"
        dest_dir = self.uploads
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{stem}.safetensors"
        n = 1
        while dest.exists():
            n += 1
            dest = dest_dir / f"{stem}-{n}.safetensors"
        shutil.copyfile(src, dest)
        return "uploads/" + dest.name

    # -- retrieval --------------------------------------------------------------------------------
    def auto(self, prompt: str, top_k: int | None = None, min_score: float | None = None) -> dict:
        """The retriever's choice for ``prompt``: ``{"picks": [{name, weight, score, span, reason,
        trigger_words, preview}], "left_out": [{name, why}], "notice"}`` (names are library names)."""
        from lora_composer.prompt_syntax import parse_prompt

        clean, _ = parse_prompt(prompt or "")
        if not clean.strip():
            raise ComposerError("write a prompt first: the retriever matches LoRAs to it")
        top_k = _default_top_k() if top_k is None else int(top_k)

        def choose():
            self.pipe.choose_loras(clean, top_k=top_k, min_score=min_score)
            return self.pipe.last_retrieval

        found = self._run(choose)
        files = {p: rel for rel, p in self.library_files().items()}
        picks = []
        for m in found:
            real = Path(m.path).resolve()
            if real not in files:  # the catalog can only name files inside the library; be sure
                continue
            preview = getattr(m.row, "preview", None)
            preview_path = None
            if preview:
                pv = Path(preview)
                pv = (pv if pv.is_absolute() else real.parent / pv).resolve()
                if pv.is_file() and pv.is_relative_to(self.library):
                    preview_path = str(pv)
            picks.append(
                {
                    "name": files[real],
                    "weight": float(m.weight),
                    "score": float(m.score),
                    "reason": m.reason,
                    "span": getattr(m, "span", None) or "",
                    "trigger_words": list(getattr(m.row, "trigger_words", []) or []),
                    "preview": preview_path,
                }
            )
        left = []
        for lo in getattr(found, "left_out", []):
            real = Path(lo.match.path).resolve()
            left.append({"name": files.get(real, lo.match.name), "why": lo.why})
        for m in getattr(found, "dropped", []):
            real = Path(m.path).resolve()
            left.append({"name": files.get(real, m.name), "why": f'over the cap of {top_k} (it covers "{m.span}")'})
        return {"picks": picks, "left_out": left, "notice": getattr(found, "notice", None)}

    # -- PNG info -----------------------------------------------------------------------------------
    def library_name(self, ref: str) -> str:
        """The library name for a tag's or a record's LoRA name; the name itself when it is not there."""
        try:
            path = self.lora_path(ref)
        except ComposerError:
            return ref
        return next((name for name, p in self.library_files().items() if p == path), ref)

    def restore(self, png_path) -> dict:
        """Every setting a PNG holds: our ``lora-composer`` record, else A1111's ``parameters``.

        Returns ``{prompt, negative_prompt, strategy, strategy_args, seed, steps, guidance, width, height,
        sampler, slots, notes}``; ``prompt`` carries one ``<lora:...>`` tag per LoRA row (``slots``);
        ``notes`` names what could not be restored (a LoRA not in this library, another model).
        """
        from lora_composer.pnginfo import PARAMETERS_KEY, RECORD_KEY, GenerationRecord, read_texts

        texts = read_texts(png_path)
        notes = []
        if RECORD_KEY in texts:
            try:
                rec = GenerationRecord.from_json(texts[RECORD_KEY])
            except (ValueError, TypeError) as exc:
                raise ComposerError(f"damaged lora-composer metadata in this PNG ({_one_line(exc)})") from None
            slots = [
                ui_view.new_slot(
                    self.library_name(str(lo.get("name", ""))),
                    float(lo.get("te_weight", 1.0)),
                    float(lo.get("unet_weight", lo.get("te_weight", 1.0))),
                )
                for lo in rec.loras
            ]
            out = {
                "prompt": ui_view.strip_tags(rec.prompt),
                "negative_prompt": rec.negative_prompt or "",
                "strategy": rec.strategy or "merge",
                "strategy_args": _args_from_record(rec.strategy_args),
                "seed": rec.seed,
                "steps": rec.steps,
                "guidance": rec.guidance_scale,
                "width": rec.width,
                "height": rec.height,
                "sampler": rec.scheduler or rec.sampler or None,
                "slots": slots,
            }
            if rec.model and not _same_model(rec.model, self.model):
                notes.append(f"made with the model {rec.model}; this server runs {Path(self.model).name}")
        elif PARAMETERS_KEY in texts:
            p = ui_view.parse_a1111(texts[PARAMETERS_KEY])
            slots = ui_view.slots_from_prompt(p["prompt"], self.library_name)
            if slots is None:
                raise ComposerError("the PNG's prompt has an unreadable <lora:...> tag")
            size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", p.get("Size", ""))

            def number(key, kind):
                try:
                    return kind(p[key]) if key in p else None
                except ValueError:
                    notes.append(f"{key}: {p[key]!r} is not a number")
                    return None

            out = {
                "prompt": ui_view.strip_tags(p["prompt"]),
                "negative_prompt": p["negative_prompt"],
                "strategy": p.get("Lora strategy", "merge"),
                "strategy_args": "",
                "seed": number("Seed", int),
                "steps": number("Steps", int),
                "guidance": number("CFG scale", float),
                "width": int(size.group(1)) if size else None,
                "height": int(size.group(2)) if size else None,
                "sampler": p.get("Sampler"),
                "slots": slots,
            }
        else:
            raise ComposerError("this PNG holds no generation settings (no 'parameters' text)")
        if out["sampler"]:
            try:
                out["sampler"] = self.sampler_class(out["sampler"])
            except ComposerError:
                notes.append(f"sampler {out['sampler']} is not available here; the model's is kept")
                out["sampler"] = None
        known = set(self.library_names())
        for slot in out["slots"]:
            if slot["name"] not in known:
                notes.append(f"LoRA {slot['name']} is not in this library")
        out["prompt"] = ui_view.prompt_with_slots(out["prompt"], out["slots"])
        out["notes"] = notes
        return out

    # -- rendering --------------------------------------------------------------------------------
    def render(
        self,
        prompt,
        negative_prompt="",
        loras=(),
        strategy="merge",
        strategy_args=None,
        seed=-1,
        steps=20,
        guidance=None,
        width=None,
        height=None,
        batch=1,
        compare_strategy=None,
        compare_args=None,
        progress=None,
        sampler=None,
        stop_key=None,
    ) -> dict:
        """Render (and, with ``compare_strategy``, render the same seed again with it).

        ``loras``: ``[(library name, te, unet)]``; ``<lora:name:w>`` tags in the prompt must name library
        files too. ``guidance`` defaults to the model's (:attr:`default_guidance`: 5 for the mini world, else
        7.5). ``sampler``: a scheduler class name of :attr:`samplers` (or its A1111 name); ``stop_key``: the
        session whose :meth:`stop` ends this render at its next step (:class:`Stopped`).
        Returns ``{"images": [(path, caption)], "heatmaps": [path], "weights": [(steps x adapters, adapters,
        strategy)], "pngs": [path], "seed", "records"}``.
        """
        from lora_composer.fusion.registry import choices
        from lora_composer.fusion.registry import STRATEGIES
        from lora_composer.prompt_syntax import parse_prompt, with_tag_names

        prompt = prompt or ""
        clean, tag_refs = parse_prompt(prompt)
        rows = [(str(self.lora_path(n)), float(te), float(unet)) for n, te, unet in loras if n]
        tagged = [(str(self.lora_path(r.name)), r.te_weight, r.unet_weight) for r in tag_refs]
        refs = rows + tagged
        # regional strategies read the tags where they stand (each acts in its region): the prompt keeps them,
        # named by their library files, and only the rows no tag names act everywhere
        regional_prompt = with_tag_names(prompt, [path for path, _, _ in tagged])
        regional_rows = [r for r in rows if r[0] not in {path for path, _, _ in tagged}]
        steps = int(steps)
        guidance = self.default_guidance if guidance is None else float(guidance)
        if steps < 1 or steps > 200:
            raise ComposerError("steps must be between 1 and 200")
        for label, v in (("width", width), ("height", height)):
            if v is not None and (int(v) < 8 or int(v) % 8 or int(v) > 2048):
                raise ComposerError(f"{label} must be a multiple of 8 between 8 and 2048")
        batch = int(batch)
        if batch < 1 or batch > 8:
            raise ComposerError("batch must be between 1 and 8")
        seed = -1 if seed is None or seed == "" else int(seed)
        if seed != -1 and not 0 <= seed <= MAX_SEED:  # -1 is random, as on the command line (A1111's meaning)
            raise ComposerError(f"seed {seed}: must be between 0 and {MAX_SEED} (or -1: random)")
        seed = random.randrange(2**32) if seed == -1 else seed
        runs = [(strategy or "merge", strategy_args or {})]
        if compare_strategy:
            runs.append((compare_strategy, compare_args if compare_args is not None else {}))
        for name, _ in runs:
            if name not in choices():
                raise ComposerError(f"unknown strategy '{name}'; valid: {', '.join(choices())}")
        scheduler_cls = self.samplers[self.sampler_class(sampler)]
        stop = threading.Event()
        if stop_key is not None:
            self._stops[stop_key] = stop

        job = Path(tempfile.mkdtemp(prefix=f"{seed}-", dir=self.out_dir))
        result = {"images": [], "heatmaps": [], "weights": [], "pngs": [], "seed": seed, "records": []}
        total = steps * len(runs)
        try:
            for k, (name, args) in enumerate(runs):

                def on_step(pipe, i, t, kwargs, _k=k, _name=name):
                    self.step = _k * steps + i + 1
                    if stop.is_set():  # checked after every step: the render ends here
                        if self.last_stop is not None:
                            self.last_stop.update(stopped_at=self.step, steps=total)
                        raise Stopped(f"stopped after step {self.step} of {total}")
                    if progress is not None:
                        progress(self.step / total, desc=f"{_name}: step {i + 1}/{steps}")
                    return kwargs

                def call(name=name, args=args, on_step=on_step):  # one render at a time, this request's adapters
                    self.step = k * steps
                    if stop.is_set():
                        raise Stopped(f"stopped after step {self.step} of {total}")
                    base = self.pipe.pipe.scheduler
                    if type(base) is not scheduler_cls:
                        self.pipe.pipe.scheduler = scheduler_cls.from_config(self.base_scheduler.config)
                    try:
                        regional = STRATEGIES[name].regional
                        images = self.pipe(
                            regional_prompt if regional else clean,
                            negative_prompt=negative_prompt or None,
                            loras=regional_rows if regional else refs,
                            strategy=name,
                            strategy_args=args or None,
                            num_inference_steps=steps,
                            guidance_scale=float(guidance),
                            seed=seed,
                            width=int(width) if width else None,
                            height=int(height) if height else None,
                            num_images_per_prompt=batch,
                            progress=False,
                            callback_on_step_end=on_step,
                        )
                    finally:
                        self.pipe.pipe.scheduler = self.base_scheduler
                    return images, self.pipe.last_record, self.pipe.last_driver

                result_k = self._run(call)
                self._keep(job, result, k, name, seed, batch, *result_k)
        finally:
            if stop_key is not None and self._stops.get(stop_key) is stop:
                del self._stops[stop_key]
        return result

    def grid(
        self,
        prompt,
        negative_prompt="",
        loras=(),
        strategy="merge",
        strategy_args=None,
        seed=-1,
        steps=20,
        guidance=None,
        width=None,
        height=None,
        sampler=None,
        x="",
        y="",
        z="",
        progress=None,
        stop_key=None,
    ) -> dict:
        """An X/Y/Z plot of these settings (``x``, ``y``, ``z``: axes as ``compose grid`` takes them,
        ``weight:NAME=0.4,0.7,1``, ``strategy=merge,regional``...; ``y`` and ``z`` optional). Cells share
        denoiser passes as there (:mod:`lora_composer.frontends.grid`). Returns ``{"images": [(path, caption)],
        "pngs": [path], "cells", "seconds", "batched"}``: one labelled PNG per Z value, each holding every
        cell's record."""
        import time

        axes = {}
        for flag, text in (("X axis", x), ("Y axis", y), ("Z axis", z)):
            axes[flag] = gridmod.parse_axis(text, flag) if (text or "").strip() else None
        if axes["X axis"] is None:
            raise ComposerError("give an X axis, e.g. weight:star-shape=0.4,0.7,1 or strategy=merge,composite")
        gridmod.check_axes(axes)
        if int(steps) < 1 or int(steps) > 200:
            raise ComposerError("steps must be between 1 and 200")
        seed = -1 if seed is None or seed == "" else int(seed)
        if seed != -1 and not 0 <= seed <= MAX_SEED:
            raise ComposerError(f"seed {seed}: must be between 0 and {MAX_SEED} (or -1: random)")
        if strategy == AUTO:  # the Generate tab's auto: chosen once for the grid, as a render would choose it
            strategy = resolve_auto(prompt or "", len([n for n, _, _ in loras if n]), self.pipe.world)[0]
        base = {
            "prompt": prompt or "",
            "negative_prompt": negative_prompt or "",
            "loras": [(self.lora_path(n), float(te), float(unet)) for n, te, unet in loras if n],
            "strategy": strategy or "merge",
            "strategy_args": strategy_args or {},
            "seed": random.randrange(2**32) if seed == -1 else seed,
            "steps": int(steps),
            "guidance": self.default_guidance if guidance is None else float(guidance),
            "sampler": self.sampler_class(sampler),
            "width": int(width) if width else None,
            "height": int(height) if height else None,
        }
        for c in axes.values():
            if c is not None and c.kind == "sampler":
                for name in c.values:
                    self.sampler_class(name)
        plot = gridmod.plan(base, axes["X axis"], axes["Y axis"], axes["Z axis"], self.lora_path)
        gridmod.fill_defaults(self.pipe, plot)
        stop = threading.Event()
        if stop_key is not None:
            self._stops[stop_key] = stop

        def report(done, total):
            self.step = done
            if progress is not None:
                progress(done / max(1, total), desc=f"grid of {len(plot.flat())}: step {done}/{total}")

        job = Path(tempfile.mkdtemp(prefix="grid-", dir=self.out_dir))
        started = time.perf_counter()
        try:
            self._run(lambda: gridmod.run(self.pipe, plot, progress=report, stop=stop.is_set))
        except ComposerError:
            if stop.is_set():
                raise Stopped("stopped: the grid was not finished") from None
            raise
        finally:
            if stop_key is not None and self._stops.get(stop_key) is stop:
                del self._stops[stop_key]
        seconds = time.perf_counter() - started
        result = {
            "images": [],
            "pngs": [],
            "cells": len(plot.flat()),
            "seconds": seconds,
            "batched": sum(1 for c in plot.flat() if c.batched_with),
        }
        for k, path in enumerate(gridmod.out_paths(job / "grid.png", plot)):
            gridmod.save_grid(plot, k, path)
            caption = plot.z.label(plot.z.values[k]) if plot.z else f"{len(plot.flat())} cells"
            result["images"].append((str(path), caption))
            result["pngs"].append(str(path))
        return result

    def _keep(self, job, result, k, name, seed, batch, images, record, driver):
        from lora_composer.explain import effective_weights, save_explanation
        from lora_composer.pnginfo import save_png

        for j, image in enumerate(images):
            path = job / f"{k}-{name}-{seed}-{j}.png"
            save_png(image, path, record)
            result["images"].append((str(path), f"{name} · seed {seed}" + (f" · #{j + 1}" if batch > 1 else "")))
            result["pngs"].append(str(path))
        heat = job / f"{k}-{name}-{seed}.explain.png"
        save_explanation(driver.history, driver.adapters, heat, record.strategy)
        result["heatmaps"].append(str(heat))
        result["weights"].append((effective_weights(driver.history).tolist(), list(driver.adapters), record.strategy))
        result["records"].append(record)


# -- the Gradio app -------------------------------------------------------------------------------
CSS = """
#gallery img, #history img, #auto-previews img { image-rendering: crisp-edges; image-rendering: pixelated; }
#gallery img, #history img, #grid-gallery img { object-fit: contain !important; }
#gallery .thumbnail-item { max-height: 380px; max-width: 380px; margin: 0 auto; }
/* captions under the images, not over their corner */
#gallery .thumbnail-item, #history .thumbnail-item, #grid-gallery .thumbnail-item { display: flex;
  flex-direction: column; aspect-ratio: auto; overflow: visible; }
#gallery .thumbnail-item > img, #history .thumbnail-item > img, #grid-gallery .thumbnail-item > img {
  flex: 1 1 auto; min-height: 0; }
#gallery .caption-label, #history .caption-label, #grid-gallery .caption-label { position: static; flex: none;
  max-width: 100%; border: 0; background: none; opacity: 0.8; padding: 2px 4px; }
/* history: whole small images in a wrapping row, never one wide cropped strip */
#history .grid-container { grid-template-columns: repeat(auto-fill, minmax(96px, 120px)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important; }
#history .thumbnail-item { width: 100%; height: auto; }
#history .thumbnail-item > img { width: 100%; height: auto; aspect-ratio: 1 / 1; }
#history .grid-wrap { overflow-y: auto; }
.lora-unknown input { color: #b91c1c !important; }
.lora-unknown { border-color: #b91c1c !important; }
.heat { font-size: 12px; overflow-x: auto; }
.heat-title { font-weight: 600; margin: 4px 0; }
.heat-grid { display: grid; gap: 1px; align-items: center; min-width: 0; }
.heat-name { padding-right: 8px; white-space: nowrap; }
.heat-step, .heat-corner { font-size: 10px; text-align: center; white-space: nowrap; overflow: visible; }
.heat-corner { text-align: left; }
.heat-cell { height: 18px; }
.heat-legend { display: flex; gap: 6px; align-items: center; margin-top: 4px; font-size: 11px; }
.heat-bar { display: inline-block; width: 120px; height: 10px; }
.auto-table { width: 100%; border-collapse: collapse; font-size: 13px; table-layout: auto; }
.auto-table th, .auto-table td { text-align: left; padding: 2px 6px; word-break: normal; overflow-wrap: break-word; }
.auto-table th, .auto-table td.auto-name, .auto-table td.auto-num { white-space: nowrap; }
.lora-row { align-items: end; }
"""

SCROLL_TO_AUTO = """() => setTimeout(() => { const el = document.getElementById('auto-result');
  if (!el) return; const r = el.getBoundingClientRect();
  if (r.bottom > window.innerHeight || r.top < 0) el.scrollIntoView({block: 'nearest'}); }, 400)"""

SCROLL_TO_RESULTS = """() => { const el = document.getElementById('results');
  if (el && el.getBoundingClientRect().top > window.innerHeight * 0.5) el.scrollIntoView({block: 'start'}); }"""


def _default_top_k() -> int:
    """The cap ``--loras auto`` uses, so the page and the command line pick alike."""
    from lora_composer.retriever.search import DEFAULT_TOP_K

    return DEFAULT_TOP_K


def _params_text(strategy: str) -> str:
    from lora_composer.fusion.registry import AUTO, AUTO_HELP, STRATEGIES, strategy_params

    if strategy == AUTO:
        return f"`{AUTO}`: {AUTO_HELP}."
    try:
        params = strategy_params(strategy)
    except KeyError:
        return ""
    measured = f"Measured: {STRATEGIES[strategy].measured}.\n\n" if STRATEGIES[strategy].measured else ""
    if not params:
        return f"{measured}`{strategy}` has no parameters."
    return measured + f"`{strategy}` parameters (defaults): " + ", ".join(f"`{k}={v!r}`" for k, v in params.items())


def _record_markdown(records) -> str:
    parts = []
    for rec in records:
        loras = (
            ", ".join(f"{lo['name']} (te {lo['te_weight']:g}, unet {lo['unet_weight']:g})" for lo in rec.loras)
            or "none"
        )
        parts.append(
            f"**{rec.strategy}**, seed {rec.seed}, {rec.steps} steps, {rec.sampler or rec.scheduler}, "
            f"{rec.width}x{rec.height}, {rec.elapsed_s:.2f} s; LoRAs: {loras}"
        )
    return "\n\n".join(parts)


def _model_label(ui: ComposerUI) -> str:
    from lora_composer.default_model import MODEL_NAME, is_default_model

    if is_default_model(ui.model):
        return f"`{MODEL_NAME}` (the built-in mini world: {ui.default_size}x{ui.default_size} images)"
    return f"`{Path(ui.model).name if Path(ui.model).exists() else ui.model}`"


def build_app(ui: ComposerUI):
    """The Gradio Blocks app for ``ui`` (queue enabled; call ``.launch()``, with ``css=CSS``)."""
    import gradio as gr

    from lora_composer.fusion.registry import choices

    names = ui.library_names()
    strategies = choices()
    initial = "merge" if "merge" in strategies else strategies[0]
    base_sampler = type(ui.base_scheduler).__name__

    def user_error(exc: BaseException):
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            exc = ComposerError("out of memory: use fewer steps, a smaller size or a smaller batch")
        # the page shows the message as HTML: escaped, or a quoted "<lora:..." would vanish as a tag
        return gr.Error(html.escape(log_error(exc), quote=False), print_exception=False)

    with gr.Blocks(title="lora-composer") as demo:
        slots_state = gr.State([])  # LoRA rows: [{"name", "te", "unet"}]
        # Bumped when the rows change from outside them (tags typed, Add, remove, Auto, PNG info): only then are
        # the rows drawn again, so a weight typed right after picking a LoRA is never drawn over.
        layout = gr.State(0)
        history_state = gr.State([])  # (path, caption) of every image made since the page opened
        last_seed = gr.State(None)
        gr.Markdown(
            f"**lora-composer** · model {_model_label(ui)} · {len(names)} LoRAs in the library", elem_id="header"
        )
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Generate", id="generate-tab", elem_id="generate-tab"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=5, min_width=340, elem_id="controls"):
                        prompt = gr.Textbox(
                            label="Prompt",
                            lines=2,
                            elem_id="prompt",
                            placeholder="a castle at dusk <lora:name:0.8> (tags and the LoRA rows stay in step)",
                        )
                        with gr.Row():
                            run = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")

                        gr.Markdown("**LoRAs**")

                        @gr.render(inputs=slots_state, triggers=[layout.change, demo.load])
                        def lora_rows(slots):
                            known = ui.library_names()
                            for i, slot in enumerate(slots):
                                # a name typed in a tag that is no library file is marked now, not only at Generate
                                unknown = bool(slot["name"]) and slot["name"] not in known
                                with gr.Row(elem_classes="lora-row", key=f"row-{i}"):
                                    name = gr.Dropdown(
                                        [NONE, *known],
                                        value=slot["name"],
                                        label=f"LoRA {i + 1}: not in the library" if unknown else f"LoRA {i + 1}",
                                        filterable=True,
                                        allow_custom_value=True,
                                        elem_id=f"lora-{i}",
                                        interactive=True,
                                        scale=3,
                                        min_width=140,
                                        key=f"name-{i}",
                                        elem_classes=["lora-unknown"] if unknown else None,
                                    )
                                    unet_w = gr.Number(
                                        value=slot["unet"],
                                        label="denoiser",
                                        step=0.05,
                                        elem_id=f"unet-{i}",
                                        interactive=True,
                                        scale=1,
                                        min_width=70,
                                        key=f"unet-{i}",
                                    )
                                    te_w = gr.Number(
                                        value=slot["te"],
                                        label="text enc.",
                                        step=0.05,
                                        elem_id=f"te-{i}",
                                        interactive=True,
                                        scale=1,
                                        min_width=70,
                                        key=f"te-{i}",
                                    )
                                    remove = gr.Button(
                                        "✕", elem_id=f"lora-remove-{i}", scale=0, min_width=40, key=f"remove-{i}"
                                    )

                                def set_field(field, i=i):
                                    def fn(value, prompt_text, slots):
                                        slots = [dict(s) for s in slots]
                                        if i >= len(slots):
                                            return gr.skip(), gr.skip()
                                        if field == "name":
                                            slots[i]["name"] = (value or "").strip()
                                        else:
                                            try:
                                                slots[i][field] = float(value)
                                            except (TypeError, ValueError):
                                                return gr.skip(), gr.skip()
                                        return slots, ui_view.prompt_with_slots(prompt_text, slots)

                                    return fn

                                name.input(
                                    set_field("name"),
                                    [name, prompt, slots_state],
                                    [slots_state, prompt],
                                    api_name=False,
                                    concurrency_limit=None,
                                    show_progress="hidden",
                                )
                                for comp, field in ((unet_w, "unet"), (te_w, "te")):
                                    comp.input(
                                        set_field(field),
                                        [comp, prompt, slots_state],
                                        [slots_state, prompt],
                                        api_name=False,
                                        concurrency_limit=None,
                                        show_progress="hidden",
                                    )

                                def drop(prompt_text, slots, version, i=i):
                                    slots = [dict(s) for j, s in enumerate(slots) if j != i]
                                    return slots, ui_view.prompt_with_slots(prompt_text, slots), version + 1

                                remove.click(
                                    drop,
                                    [prompt, slots_state, layout],
                                    [slots_state, prompt, layout],
                                    api_name=False,
                                    concurrency_limit=None,
                                    show_progress="hidden",
                                )

                        with gr.Row():
                            add = gr.Button("+ Add LoRA", elem_id="add-lora", size="sm")
                            auto = gr.Button("Auto: let the retriever pick", elem_id="auto", size="sm")
                            top_k = gr.Slider(
                                1,
                                MAX_TOP_K,
                                value=_default_top_k(),
                                step=1,
                                label="at most",
                                elem_id="top-k",
                                min_width=120,
                            )
                        auto_html = gr.HTML(elem_id="auto-result")
                        auto_previews = gr.Gallery(
                            label="Previews", columns=4, height=120, visible=False, elem_id="auto-previews"
                        )

                        with gr.Accordion("Settings", open=True):
                            with gr.Row():
                                seed = gr.Number(
                                    value=-1, precision=0, label="Seed (-1: random)", elem_id="seed", min_width=120
                                )
                                reuse = gr.Button(
                                    "♻ Reuse seed", elem_id="reuse-seed", size="sm", scale=0, min_width=110
                                )
                                sampler = gr.Dropdown(
                                    ui.sampler_choices(),
                                    value=base_sampler,
                                    label="Sampler",
                                    elem_id="sampler",
                                    min_width=160,
                                )
                            with gr.Row():
                                steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                                guidance = gr.Slider(
                                    0, 20, value=ui.default_guidance, step=0.5, label="Guidance", elem_id="guidance"
                                )
                            with gr.Row():
                                # sizes follow the model: its multiple, up to its budget (4x its native side at 50 steps)
                                multiple, native = ui.pipe.size_rules()
                                native_h, native_w = native or (ui.default_size, ui.default_size)
                                width = gr.Slider(
                                    multiple,
                                    4 * native_w,
                                    value=native_w,
                                    step=multiple,
                                    label="Width",
                                    elem_id="width",
                                )
                                height = gr.Slider(
                                    multiple,
                                    4 * native_h,
                                    value=native_h,
                                    step=multiple,
                                    label="Height",
                                    elem_id="height",
                                )
                                batch = gr.Slider(1, 8, value=1, step=1, label="Batch", elem_id="batch")
                            with gr.Row():
                                strategy = gr.Dropdown(strategies, value=initial, label="Strategy", elem_id="strategy")
                                compare = gr.Dropdown(
                                    [NONE, *strategies],
                                    value=NONE,
                                    label="Side by side with (same seed)",
                                    elem_id="compare",
                                )
                            params_md = gr.Markdown(_params_text(initial))
                            param_groups, param_widgets = {}, {}
                            for sname in strategies:
                                params = _strategy_params(sname)
                                if not params:
                                    continue
                                with gr.Row(visible=sname == initial) as group:
                                    param_widgets[sname] = [
                                        (k, d, _param_widget(sname, k, d)) for k, d in params.items()
                                    ]
                                param_groups[sname] = group
                            strategy_args = gr.Textbox(
                                label="Strategy parameters (KEY=VALUE, space or newline separated)",
                                placeholder="set by the widgets above, or typed: every=2",
                                elem_id="strategy-args",
                            )
                        with gr.Accordion("PNG info: restore the settings of an image", open=False):
                            png_in = gr.File(
                                label="A PNG made here, by compose or by AUTOMATIC1111",
                                file_types=[".png"],
                                type="filepath",
                                elem_id="png-info",
                            )
                            png_md = gr.Markdown(elem_id="png-info-result")
                        with gr.Accordion("Library", open=False):
                            search = gr.Textbox(label="Search (name or trigger words)", elem_id="search")
                            table = gr.Dataframe(
                                headers=["name", "kind", "MB", "trigger words"],
                                value=ui.catalog_rows(),
                                interactive=False,
                            )
                            if ui.allow_uploads:
                                upload = gr.File(
                                    label=f"Add a .safetensors LoRA (at most {ui.max_upload_bytes // 2**20} MB)",
                                    file_types=[".safetensors"],
                                    type="filepath",
                                )
                                upload_md = gr.Markdown()
                    with gr.Column(scale=6, min_width=340, elem_id="results"):
                        gallery = gr.Gallery(
                            label="Images",
                            columns=1,
                            format="png",
                            elem_id="gallery",
                            height=440,
                            object_fit="contain",
                            allow_preview=True,
                        )
                        info = gr.Markdown(elem_id="info")
                        heatmap = gr.HTML(elem_id="heatmap")
                        files = gr.File(
                            label="PNG with metadata, weights heatmap PNG", file_count="multiple", elem_id="download"
                        )
                        history = gr.Gallery(
                            label="Made since this page opened",
                            columns=6,
                            height=280,
                            format="png",
                            object_fit="contain",
                            elem_id="history",
                            allow_preview=True,
                        )
            with gr.Tab("Grid", id="grid-tab", elem_id="grid-tab"):
                gr.Markdown(
                    "An X/Y/Z plot of the **Generate** tab's prompt, LoRAs and settings: each axis is "
                    "`KIND=V1,V2,...` with KIND `weight:LORA`, `loras` (sets: `a+b:0.8,a,none`), `strategy`, "
                    "`seed`, `steps`, `guidance` or `sampler`. Cells that differ in LoRA weights (and seeds, steps, guidance, strategies that "
                    "plan row groups) share one denoiser pass per step; one PNG per Z value, every cell's "
                    "settings in its metadata (`compose grid` makes the same)."
                )
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=300):
                        grid_x = gr.Textbox(
                            label="X axis (columns)", elem_id="grid-x", placeholder="weight:star-shape=0.4,0.7,1"
                        )
                        grid_y = gr.Textbox(
                            label="Y axis (rows, optional)", elem_id="grid-y", placeholder="strategy=merge,composite"
                        )
                        grid_z = gr.Textbox(
                            label="Z axis (one grid per value, optional)", elem_id="grid-z", placeholder="seed=1,2"
                        )
                        with gr.Row():
                            grid_run = gr.Button("Make grid", variant="primary", elem_id="grid-run", scale=3)
                            grid_stop = gr.Button("Stop", variant="stop", elem_id="grid-stop", scale=1)
                        grid_info = gr.Markdown(elem_id="grid-info")
                    with gr.Column(scale=7, min_width=340):
                        grid_gallery = gr.Gallery(
                            label="Grids",
                            columns=1,
                            format="png",
                            elem_id="grid-gallery",
                            height=560,
                            object_fit="contain",
                            allow_preview=True,
                        )
                        grid_files = gr.File(
                            label="Grid PNGs (every cell's settings inside)",
                            file_count="multiple",
                            elem_id="grid-download",
                        )

        # -- strategy parameters
        strategy.change(_params_text, strategy, params_md, api_name=False)
        groups = list(param_groups.items())
        if groups:
            strategy.input(
                lambda name: [gr.update(visible=n == name) for n, _ in groups] + [""],
                strategy,
                [g for _, g in groups] + [strategy_args],
                api_name=False,
            )
            strategy.change(
                lambda name: [gr.update(visible=n == name) for n, _ in groups],
                strategy,
                [g for _, g in groups],
                api_name=False,
            )
        for sname, widgets in param_widgets.items():
            comps = [c for _, _, c in widgets]

            def to_text(*values, widgets=widgets):
                return _args_text([(k, d) for k, d, _ in widgets], values)

            for comp in comps:
                comp.input(to_text, comps, strategy_args, api_name=False)
        search.change(ui.catalog_rows, search, table, api_name=False)

        # -- LoRA rows <-> prompt tags
        def from_prompt(prompt_text, slots, version):
            new = ui_view.slots_from_prompt(prompt_text, ui.library_name)
            if new is None or new == [s for s in slots if s.get("name")]:
                return gr.skip(), gr.skip()
            return new + [s for s in slots if not s.get("name")], version + 1  # keep rows still being filled in

        prompt.change(
            from_prompt,
            [prompt, slots_state, layout],
            [slots_state, layout],
            api_name=False,
            concurrency_limit=None,
            show_progress="hidden",
            trigger_mode="always_last",
        )
        add.click(
            lambda slots, version: ([*slots, ui_view.new_slot()], version + 1),
            [slots_state, layout],
            [slots_state, layout],
            api_name=False,
            concurrency_limit=None,
            show_progress="hidden",
        )

        # -- generate / stop
        def generate(
            prompt,
            negative,
            strategy,
            args_text,
            compare,
            sampler,
            seed,
            steps,
            guidance,
            width,
            height,
            batch,
            slots,
            history_items,
            request: gr.Request,
            progress=gr.Progress(),
        ):
            try:
                loras = [(s["name"], s["te"], s["unet"]) for s in (slots or []) if s.get("name")]
                args = parse_strategy_args(args_text)
                res = ui.render(
                    prompt,
                    negative,
                    loras,
                    strategy,
                    args,
                    seed,
                    steps,
                    guidance,
                    width,
                    height,
                    batch,
                    compare_strategy=compare or None,
                    compare_args=args if compare == strategy else {},
                    progress=progress,
                    sampler=sampler,
                    stop_key=getattr(request, "session_hash", None) or "",
                )
            except Exception as exc:  # shown in the page, one line in the log; the server keeps serving
                error = user_error(exc)
                ui.last_errors[getattr(request, "session_hash", None) or ""] = html.unescape(error.message)
                raise error from None
            heat = "".join(
                ui_view.heatmap_html(w, a, f"{s}: weight of each LoRA per step") for w, a, s in res["weights"]
            )
            history_items = [*(history_items or []), *res["images"]]
            return (
                res["images"],
                _record_markdown(res["records"]),
                heat,
                res["pngs"] + res["heatmaps"],
                history_items,
                history_items,
                res["seed"],
            )

        generate.__annotations__["request"] = gr.Request  # (annotations are strings in this module)
        # The previous render's caption, heatmap and files go when a new one starts; if it fails, its image
        # and the Auto table go too, and the caption says what failed: nothing on screen reads as its result.
        gen_event = run.click(
            lambda: ("*Rendering…*", "", None),
            None,
            [info, heatmap, files],
            api_name=False,
            queue=False,
            show_progress="hidden",
        ).then(
            generate,
            [
                prompt,
                negative,
                strategy,
                strategy_args,
                compare,
                sampler,
                seed,
                steps,
                guidance,
                width,
                height,
                batch,
                slots_state,
                history_state,
            ],
            [gallery, info, heatmap, files, history_state, history, last_seed],
            api_name="generate",
            concurrency_limit=1,
            show_progress_on=[gallery],
        )

        def failed(request: gr.Request):
            why = ui.last_errors.pop(getattr(request, "session_hash", None) or "", "")
            return (
                None,
                f"**Nothing rendered**: {html.escape(why, quote=False) or 'the request failed'}",
                "",
                None,
                "",
                gr.update(value=None, visible=False),
            )

        failed.__annotations__["request"] = gr.Request
        gen_event.failure(
            failed,
            None,
            [gallery, info, heatmap, files, auto_html, auto_previews],
            api_name=False,
            queue=False,
            show_progress="hidden",
        )
        run.click(None, None, None, js=SCROLL_TO_RESULTS, api_name=False)

        def stop_render(request: gr.Request):
            ui.stop(getattr(request, "session_hash", None) or "")
            return "Stopped."

        stop_render.__annotations__["request"] = gr.Request

        stop.click(stop_render, None, info, cancels=[gen_event], api_name="stop", concurrency_limit=None)
        reuse.click(
            lambda s: gr.skip() if s is None else s,
            last_seed,
            seed,
            api_name=False,
            concurrency_limit=None,
            show_progress="hidden",
        )

        # -- Auto
        def pick(prompt_text, k, slots, version):
            try:
                found = ui.auto(prompt_text, top_k=int(k))
            except Exception as exc:
                raise user_error(exc) from None
            picks = found["picks"]
            new = [ui_view.new_slot(m["name"], m["weight"], m["weight"]) for m in picks]
            previews = [(m["preview"], m["name"]) for m in picks if m["preview"]]
            return (
                ui_view.auto_html(picks, found["left_out"], found["notice"]),
                gr.update(value=previews, visible=bool(previews)),
                new,
                ui_view.prompt_with_slots(prompt_text, new),
                version + 1,
            )

        auto.click(
            pick,
            [prompt, top_k, slots_state, layout],
            [auto_html, auto_previews, slots_state, prompt, layout],
            api_name="auto",
            concurrency_limit=1,
        ).then(None, None, None, js=SCROLL_TO_AUTO, api_name=False)

        # -- Grid
        def make_grid(
            prompt,
            negative,
            strategy,
            args_text,
            sampler,
            seed,
            steps,
            guidance,
            width,
            height,
            slots,
            x,
            y,
            z,
            request: gr.Request,
            progress=gr.Progress(),
        ):
            try:
                loras = [(s["name"], s["te"], s["unet"]) for s in (slots or []) if s.get("name")]
                res = ui.grid(
                    prompt,
                    negative,
                    loras,
                    strategy,
                    parse_strategy_args(args_text),
                    seed,
                    steps,
                    guidance,
                    width,
                    height,
                    sampler,
                    x,
                    y,
                    z,
                    progress=progress,
                    stop_key=getattr(request, "session_hash", None) or "",
                )
            except Exception as exc:
                raise user_error(exc) from None
            note = (
                f"{res['cells']} cells in {res['seconds']:.1f} s; {res['batched']} of them shared denoiser "
                "passes with others."
            )
            return res["images"], note, res["pngs"]

        make_grid.__annotations__["request"] = gr.Request
        grid_event = grid_run.click(
            lambda: (None, "*Rendering the grid…*", None),
            None,
            [grid_gallery, grid_info, grid_files],
            api_name=False,
            queue=False,
            show_progress="hidden",
        ).then(
            make_grid,
            [
                prompt,
                negative,
                strategy,
                strategy_args,
                sampler,
                seed,
                steps,
                guidance,
                width,
                height,
                slots_state,
                grid_x,
                grid_y,
                grid_z,
            ],
            [grid_gallery, grid_info, grid_files],
            api_name="grid",
            concurrency_limit=1,
            show_progress_on=[grid_gallery],
        )
        grid_event.failure(
            lambda: "**Nothing rendered**: see the message.",
            None,
            grid_info,
            api_name=False,
            queue=False,
            show_progress="hidden",
        )
        grid_stop.click(stop_render, None, grid_info, cancels=[grid_event], api_name=False, concurrency_limit=None)

        # -- PNG info
        def restore(path, version):
            if not path:
                return [gr.skip()] * 14
            try:
                r = ui.restore(path)
            except Exception as exc:
                raise user_error(exc) from None
            keep = gr.skip()
            strat = r["strategy"] if r["strategy"] in strategies else keep
            if r["strategy"] not in strategies:
                r["notes"].append(f"strategy {r['strategy']} is not available here")
            msg = "Restored the image's settings." + "".join(f"\n- {n}" for n in r["notes"])
            return (
                r["prompt"],
                r["negative_prompt"],
                strat,
                r["strategy_args"],
                keep if r["seed"] is None else r["seed"],
                keep if r["steps"] is None else r["steps"],
                keep if r["guidance"] is None else r["guidance"],
                keep if r["width"] is None else r["width"],
                keep if r["height"] is None else r["height"],
                r["sampler"] or base_sampler,
                r["slots"],
                msg,
                NONE,
                version + 1,
            )

        png_in.upload(
            restore,
            [png_in, layout],
            [
                prompt,
                negative,
                strategy,
                strategy_args,
                seed,
                steps,
                guidance,
                width,
                height,
                sampler,
                slots_state,
                png_md,
                compare,
                layout,
            ],
            api_name="png_info",
            concurrency_limit=None,
        )

        if ui.allow_uploads:

            def uploaded(path):
                if not path:
                    return gr.skip(), ""
                try:
                    name = ui.add_upload(path)
                except Exception as exc:
                    raise user_error(exc) from None
                return ui.catalog_rows(), f"Added `{name}`: pick it in a LoRA row."

            upload.upload(uploaded, upload, [table, upload_md], api_name=False)

    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch(ui: ComposerUI, host: str = "127.0.0.1", port: int | None = None, block: bool = True, **kwargs):
    """Build and launch the app; returns the Blocks (``block=False``: serving in the background)."""
    demo = build_app(ui)
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        show_error=True,
        max_file_size=ui.max_upload_bytes,
        allowed_paths=[str(ui.out_dir)],
        quiet=not block,
        css=CSS,
        **kwargs,
    )
    return demo


@command("compose ui")
def main(argv: list[str]) -> int:
    p = Parser(prog="compose ui", description="Start the lora-composer web UI (Gradio).")
    p.add_argument(
        "--model", "-m", metavar="DIR_OR_ID", help="diffusers model folder or Hub id (default: the mini world model)"
    )
    p.add_argument(
        "--library", metavar="DIR", help="LoRA folder (default: $LORA_COMPOSER_LIBRARY, or the mini world's library)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", metavar="ADDR", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, metavar="N", help="port (default 7860)")
    p.add_argument(
        "--max-upload-mb",
        type=int,
        default=DEFAULT_MAX_UPLOAD_MB,
        metavar="MB",
        help=f"largest LoRA upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB})",
    )
    p.add_argument("--no-uploads", action="store_true", help="do not offer LoRA uploads")
    p.add_argument(
        "--uploads",
        action="store_true",
        help="offer LoRA uploads on a --host reachable from other machines too (off there by default)",
    )
    p.add_argument(
        "--auth-file",
        metavar="FILE",
        help=f"USER:PASSWORD on one line: the login the page asks for "
        f"(else ${AUTH_ENV}); required with a --host reachable from other machines",
    )
    add_log_args(p)
    add_device_args(p)
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    auth, open_bind = read_auth(args.auth_file), not is_loopback(args.host)
    if open_bind and auth is None:
        raise UsageError(
            f"--host {args.host} is reachable from other machines: set a login (--auth-file FILE "
            f"holding USER:PASSWORD, or ${AUTH_ENV})"
        )
    if args.uploads and args.no_uploads:
        raise UsageError("--uploads and --no-uploads contradict each other")
    uploads = not args.no_uploads and (args.uploads or not open_bind)
    library = args.library or os.environ.get("LORA_COMPOSER_LIBRARY") or None
    ui = ComposerUI(
        args.model,
        library,
        max_upload_mb=args.max_upload_mb,
        allow_uploads=uploads,
        device=args.device,
        dtype=args.dtype,
    )
    print(
        f"lora-composer UI on http://{args.host}:{args.port} (model {ui.model}, library {ui.library}"
        f"{', login required' if auth else ''}{', uploads on' if uploads else ', uploads off'})"
    )
    launch(ui, host=args.host, port=args.port, auth=auth)
    return 0


AUTH_ENV = "LORA_COMPOSER_UI_AUTH"


def read_auth(path: str | None) -> tuple[str, str] | None:
    """The UI's login, ``(user, password)``, from ``path`` or ``$LORA_COMPOSER_UI_AUTH`` (``USER:PASSWORD``)."""
    where = f"--auth-file {path}" if path else f"${AUTH_ENV}"
    text = Path(path).expanduser().read_text(encoding="utf-8").strip() if path else os.environ.get(AUTH_ENV, "")
    if not text:
        if path:
            raise UsageError(f"{where}: the file is empty (expected USER:PASSWORD)")
        return None
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise UsageError(f"{where}: expected USER:PASSWORD on one line")
    return user.strip(), password
