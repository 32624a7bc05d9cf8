"""``compose ui`` / ``python app.py``: a Gradio web UI over :class:`~lora_composer.pipeline.ComposerPipeline`.

    compose ui                                   # the default model (the mini world), http://127.0.0.1:7860
    compose ui --model DIR_OR_ID --library DIR --host 0.0.0.0 --port 8080

The model and the LoRA library are fixed at start-up. The browser only ever names LoRAs by their path
relative to the library (what :func:`library_names` lists); anything else, including absolute paths,
``..`` and symlinks that leave the folder, is refused. Renders go through Gradio's queue and one lock, so
several browsers share one pipeline and each request sets its own adapters.
"""

from __future__ import annotations

import html
import os
import random
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
import contextvars
from pathlib import Path

from lora_composer.errors import ComposerError
from lora_composer.frontends.args import Parser, command
from lora_composer.vocab import LORA_EXTENSIONS
from lora_composer.fusion.registry import parse_strategy_args

MAX_SLOTS = 4  # LoRA rows in the picker
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
    return gr.Textbox(value=_shown(default), label=key, placeholder="default" if default is None else "",
                      elem_id=elem)


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


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class ComposerUI:
    """The state behind the app: one pipeline, its library, a lock and an output folder."""

    def __init__(self, model=None, library=None, out_dir=None, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
                 allow_uploads: bool = True):
        from lora_composer.default_model import resolve
        from lora_composer.pipeline import ComposerPipeline

        self.model, library = resolve(model, library)
        if library is None:
            raise ComposerError("the UI needs a LoRA library folder (--library DIR)")
        self.library = Path(library).expanduser().resolve()
        if not self.library.is_dir():
            raise ComposerError(f"LoRA library {self.library} is not a folder")
        self.pipe = ComposerPipeline.from_pretrained(self.model, library=self.library)
        self.default_guidance = self.pipe.default_guidance
        self.lock = threading.Lock()
        # Every pipeline call runs on this one thread: the retriever's SQLite catalog must stay on the thread
        # that opened it, and one thread means one request's adapters at a time.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="composer-ui")
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lora-composer-ui-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_mb) * 2**20
        self.allow_uploads = allow_uploads
        unet = getattr(self.pipe.pipe, "unet", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", 64) or 64
        self.default_size = int(sample) * int(getattr(self.pipe.pipe, "vae_scale_factor", 8))

    def _run(self, fn, *args, **kwargs):
        ctx = contextvars.copy_context()  # gr.Progress and friends read context variables

        def job():
            with self.lock:
                return ctx.run(fn, *args, **kwargs)

        return self._worker.submit(job).result()

    # -- the library, confined ----------------------------------------------------------------------
    def library_files(self) -> dict[str, Path]:
        """``{relative name: resolved path}`` of every adapter file really inside the library."""
        from lora_composer.library import list_loras

        out = {}
        for path in list_loras(self.library):
            real = path.resolve()
            if real.is_file() and real.is_relative_to(self.library):
                out[path.relative_to(self.library).as_posix()] = real
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
            hits = [p for rel, p in files.items() if Path(rel).stem.lower() == stem]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ComposerError(f"LoRA name {text!r} is ambiguous in the library: pick it from the list")
        raise ComposerError(f"LoRA {text!r} is not in the library {self.library} (only its files can be used)")

    def catalog_rows(self, query: str = "") -> list[list]:
        """The library as table rows (name, size MB, trigger words), filtered by ``query``."""
        rows = []
        words = {}
        try:
            from lora_composer.retriever import Catalog

            with Catalog.for_library(self.library) as cat:
                for row in cat.rows():
                    words[Path(row.path).resolve()] = ", ".join(row.trigger_words)
        except Exception:  # no catalog yet, or no retriever: names only
            pass
        q = (query or "").strip().lower()
        for name, path in self.library_files().items():
            trig = words.get(path, "")
            if q and q not in name.lower() and q not in trig.lower():
                continue
            rows.append([name, round(path.stat().st_size / 2**20, 2), trig])
        return rows

    # -- uploads ----------------------------------------------------------------------------------
    def add_upload(self, file_path: str) -> str:
        """Copy an uploaded ``.safetensors`` file into ``LIBRARY/uploads``; returns its library name."""
        if not self.allow_uploads:
            raise ComposerError("uploads are disabled on this server")
        src = Path(file_path)
        if src.suffix.lower() != ".safetensors":
            raise ComposerError(f"{src.name}: only .safetensors files can be uploaded")
        size = src.stat().st_size
        if size > self.max_upload_bytes:
            raise ComposerError(f"{src.name}: {size / 2**20:.1f} MB is over the {self.max_upload_bytes // 2**20} MB limit")
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
        dest_dir = self.library / "uploads"
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{stem}.safetensors"
        n = 1
        while dest.exists():
            n += 1
            dest = dest_dir / f"{stem}-{n}.safetensors"
        shutil.copyfile(src, dest)
        return dest.relative_to(self.library).as_posix()

    # -- retrieval --------------------------------------------------------------------------------
    def auto(self, prompt: str, top_k: int = 3, min_score: float | None = None) -> list[dict]:
        """The retriever's picks for ``prompt``: ``[{name, weight, score, reason, trigger_words, preview}]``."""
        from lora_composer.prompt_syntax import parse_prompt

        clean, _ = parse_prompt(prompt or "")
        if not clean.strip():
            raise ComposerError("write a prompt first: the retriever matches LoRAs to it")
        def choose():
            self.pipe.choose_loras(clean, top_k=top_k, min_score=min_score)
            return list(self.pipe.last_retrieval)

        found = self._run(choose)
        files = {p: rel for rel, p in self.library_files().items()}
        out = []
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
            out.append({
                "name": files[real], "weight": float(m.weight), "score": float(m.score), "reason": m.reason,
                "trigger_words": list(getattr(m.row, "trigger_words", []) or []), "preview": preview_path,
            })
        return out

    # -- rendering --------------------------------------------------------------------------------
    def render(self, prompt, negative_prompt="", loras=(), strategy="merge", strategy_args=None, seed=-1,
               steps=20, guidance=None, width=None, height=None, batch=1, compare_strategy=None,
               compare_args=None, progress=None) -> dict:
        """Render (and, with ``compare_strategy``, render the same seed again with it).

        ``loras``: ``[(library name, te, unet)]``; ``<lora:name:w>`` tags in the prompt must name library
        files too. ``guidance`` defaults to the model's (:attr:`default_guidance`: 5 for the mini world, else
        7.5). Returns ``{"images": [(path, caption)], "heatmaps": [path], "pngs": [path], "seed", "record"}``.
        """
        from lora_composer.explain import save_explanation
        from lora_composer.pnginfo import save_png
        from lora_composer.prompt_syntax import parse_prompt
        from lora_composer.fusion import available

        prompt = prompt or ""
        clean, tag_refs = parse_prompt(prompt)
        refs = [(str(self.lora_path(n)), float(te), float(unet)) for n, te, unet in loras if n]
        refs += [(str(self.lora_path(r.name)), r.te_weight, r.unet_weight) for r in tag_refs]
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
        seed = random.randrange(2**32) if seed is None or int(seed) < 0 else int(seed)
        runs = [(strategy or "merge", strategy_args or {})]
        if compare_strategy:
            runs.append((compare_strategy, compare_args if compare_args is not None else {}))
        for name, _ in runs:
            if name not in available():
                raise ComposerError(f"unknown strategy '{name}'; valid: {', '.join(available())}")

        job = Path(tempfile.mkdtemp(prefix=f"{seed}-", dir=self.out_dir))
        result = {"images": [], "heatmaps": [], "pngs": [], "seed": seed, "records": []}
        total = steps * len(runs)
        for k, (name, args) in enumerate(runs):
            def on_step(pipe, i, t, kwargs, _k=k):
                if progress is not None:
                    progress((_k * steps + i + 1) / total, desc=f"{name}: step {i + 1}/{steps}")
                return kwargs

            def call(name=name, args=args, on_step=on_step):  # one render at a time, this request's adapters
                images = self.pipe(
                    clean, negative_prompt=negative_prompt or None, loras=refs, strategy=name,
                    strategy_args=args or None, num_inference_steps=steps, guidance_scale=float(guidance),
                    seed=seed, width=int(width) if width else None, height=int(height) if height else None,
                    num_images_per_prompt=batch, progress=False, callback_on_step_end=on_step,
                )
                return images, self.pipe.last_record, self.pipe.last_driver

            images, record, driver = self._run(call)
            for j, image in enumerate(images):
                path = job / f"{k}-{name}-{seed}-{j}.png"
                save_png(image, path, record)
                result["images"].append((str(path), f"{name} · seed {seed}" + (f" · #{j + 1}" if batch > 1 else "")))
                result["pngs"].append(str(path))
            heat = job / f"{k}-{name}-{seed}.explain.png"
            save_explanation(driver.history, driver.adapters, heat, record.strategy)
            result["heatmaps"].append(str(heat))
            result["records"].append(record)
        return result


# -- the Gradio app -------------------------------------------------------------------------------
def _params_text(strategy: str) -> str:
    from lora_composer.fusion.registry import strategy_params

    try:
        params = strategy_params(strategy)
    except KeyError:
        return ""
    if not params:
        return f"`{strategy}` has no parameters."
    return f"`{strategy}` parameters (defaults): " + ", ".join(f"`{k}={v!r}`" for k, v in params.items())


def _record_markdown(records) -> str:
    parts = []
    for rec in records:
        loras = ", ".join(f"{lo['name']} (te {lo['te_weight']:g}, unet {lo['unet_weight']:g})" for lo in rec.loras) or "none"
        parts.append(f"**{rec.strategy}**, seed {rec.seed}, {rec.steps} steps, {rec.width}x{rec.height}, "
                     f"{rec.elapsed_s:.2f} s; LoRAs: {loras}")
    return "\n\n".join(parts)


def build_app(ui: ComposerUI):
    """The Gradio Blocks app for ``ui`` (queue enabled; call ``.launch()``)."""
    import gradio as gr

    from lora_composer.fusion import available

    names = ui.library_names()
    strategies = available()

    def _err(exc: BaseException):
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return gr.Error("out of memory: use fewer steps, a smaller size or a smaller batch")
        return gr.Error(_one_line(exc))

    with gr.Blocks(title="lora-composer") as demo:
        gr.Markdown(f"# lora-composer\nModel `{ui.model}` · library `{ui.library}` ({len(names)} LoRAs)")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="a castle at dusk <lora:name:0.8> (tags work too)")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                with gr.Row():
                    strategy = gr.Dropdown(strategies, value="merge" if "merge" in strategies else strategies[0],
                                           label="Strategy", elem_id="strategy")
                    compare = gr.Dropdown([NONE, *strategies], value=NONE, label="Side by side with (same seed)",
                                          elem_id="compare")
                params_md = gr.Markdown(_params_text("merge"))
                initial = "merge" if "merge" in strategies else strategies[0]
                param_groups, param_widgets = {}, {}
                for sname in strategies:
                    params = _strategy_params(sname)
                    if not params:
                        continue
                    with gr.Row(visible=sname == initial) as group:
                        param_widgets[sname] = [(k, d, _param_widget(sname, k, d)) for k, d in params.items()]
                    param_groups[sname] = group
                strategy_args = gr.Textbox(label="Strategy parameters (KEY=VALUE, space or newline separated)",
                                           placeholder="set by the widgets above, or typed: every=2",
                                           elem_id="strategy-args")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="seed")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 20, value=ui.default_guidance, step=0.5, label="Guidance",
                                         elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(64, 1536, value=max(64, ui.default_size), step=8, label="Width")
                    height = gr.Slider(64, 1536, value=max(64, ui.default_size), step=8, label="Height")
                    batch = gr.Slider(1, 8, value=1, step=1, label="Batch")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gr.Markdown("### LoRAs")
                slots = []
                for i in range(MAX_SLOTS):
                    with gr.Row():
                        name = gr.Dropdown([NONE, *names], value=NONE, label=f"LoRA {i + 1}", filterable=True,
                                           allow_custom_value=True,  # checked server-side (lora_path)
                                           elem_id=f"lora-{i}", scale=2)
                        unet_w = gr.Slider(-2, 2, value=0.8, step=0.05, label="denoiser", elem_id=f"unet-{i}")
                        te_w = gr.Slider(-2, 2, value=0.8, step=0.05, label="text encoder", elem_id=f"te-{i}")
                    slots += [name, te_w, unet_w]
                with gr.Row():
                    auto = gr.Button("Auto: let the retriever pick", elem_id="auto")
                    top_k = gr.Slider(1, MAX_SLOTS, value=min(3, MAX_SLOTS), step=1, label="at most")
                auto_md = gr.Markdown(elem_id="auto-result")
                auto_previews = gr.Gallery(label="Previews", columns=4, height=120, visible=False)
                with gr.Accordion("Library", open=False):
                    search = gr.Textbox(label="Search (name or trigger words)", elem_id="search")
                    table = gr.Dataframe(headers=["name", "MB", "trigger words"], value=ui.catalog_rows(),
                                         interactive=False)
                    if ui.allow_uploads:
                        upload = gr.File(label=f"Add a .safetensors LoRA (at most {ui.max_upload_bytes // 2**20} MB)",
                                         file_types=[".safetensors"], type="filepath")
                        upload_md = gr.Markdown()
        with gr.Row():
            gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery", height=420,
                                 object_fit="contain")
            heatmap = gr.Gallery(label="Adapter weights per step", columns=1, format="png", elem_id="heatmap",
                                 height=420, object_fit="contain")
        with gr.Row():
            files = gr.File(label="PNG with metadata", file_count="multiple", elem_id="download")
            info = gr.Markdown(elem_id="info")

        strategy.change(_params_text, strategy, params_md, api_name=False)
        groups = list(param_groups.items())
        if groups:
            strategy.change(lambda name: [gr.update(visible=n == name) for n, _ in groups] + [""],
                            strategy, [g for _, g in groups] + [strategy_args], api_name=False)
        for sname, widgets in param_widgets.items():
            comps = [c for _, _, c in widgets]

            def to_text(*values, widgets=widgets):
                return _args_text([(k, d) for k, d, _ in widgets], values)

            for comp in comps:
                comp.change(to_text, comps, strategy_args, api_name=False)
        search.change(ui.catalog_rows, search, table, api_name=False)

        def generate(prompt, negative, strategy, args_text, compare, seed, steps, guidance, width, height, batch,
                     *slot_values, progress=gr.Progress()):
            try:
                loras = [(slot_values[i], slot_values[i + 1], slot_values[i + 2])
                         for i in range(0, len(slot_values), 3) if slot_values[i]]
                args = parse_strategy_args(args_text)
                res = ui.render(prompt, negative, loras, strategy, args, seed, steps, guidance, width, height,
                                batch, compare_strategy=compare or None,
                                compare_args=args if compare == strategy else {}, progress=progress)
            except gr.Error:
                raise
            except Exception as exc:  # shown in the page; the server keeps serving
                raise _err(exc) from None
            return res["images"], res["heatmaps"], res["pngs"], _record_markdown(res["records"])

        run.click(generate, [prompt, negative, strategy, strategy_args, compare, seed, steps, guidance, width,
                             height, batch, *slots], [gallery, heatmap, files, info],
                  api_name="generate", concurrency_limit=1)

        def pick(prompt, k):
            try:
                found = ui.auto(prompt, top_k=int(k))
            except Exception as exc:
                raise _err(exc) from None
            updates = []
            for i in range(MAX_SLOTS):
                if i < len(found):
                    w = found[i]["weight"]
                    updates += [gr.update(value=found[i]["name"]), gr.update(value=w), gr.update(value=w)]
                else:
                    updates += [gr.update(value=NONE), gr.update(), gr.update()]
            if found:
                lines = ["| LoRA | weight | score | why | trigger words |", "|---|---|---|---|---|"]
                lines += [f"| {html.escape(m['name'])} | {m['weight']:g} | {m['score']:.2f} | {html.escape(m['reason'])} "
                          f"| {html.escape(', '.join(m['trigger_words']))} |" for m in found]
                text = "\n".join(lines)
            else:
                text = "No LoRA in the library matched the prompt."
            previews = [(m["preview"], m["name"]) for m in found if m["preview"]]
            return [text, gr.update(value=previews, visible=bool(previews)), *updates]

        auto.click(pick, [prompt, top_k], [auto_md, auto_previews, *slots], api_name="auto", concurrency_limit=1)

        if ui.allow_uploads:
            def uploaded(path):
                if not path:
                    return gr.update(), "", *[gr.update() for _ in range(MAX_SLOTS)]
                try:
                    name = ui.add_upload(path)
                except Exception as exc:
                    raise _err(exc) from None
                choices = [NONE, *ui.library_names()]
                return (ui.catalog_rows(), f"Added `{name}`.",
                        *[gr.update(choices=choices) for _ in range(MAX_SLOTS)])

            upload.upload(uploaded, upload, [table, upload_md, *slots[0::3]], api_name=False)

    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch(ui: ComposerUI, host: str = "127.0.0.1", port: int | None = None, block: bool = True, **kwargs):
    """Build and launch the app; returns the Blocks (``block=False``: serving in the background)."""
    demo = build_app(ui)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                max_file_size=ui.max_upload_bytes, allowed_paths=[str(ui.out_dir)], quiet=not block, **kwargs)
    return demo


@command("compose ui")
def main(argv: list[str]) -> int:
    p = Parser(prog="compose ui", description="Start the lora-composer web UI (Gradio).")
    p.add_argument("--model", "-m", metavar="DIR_OR_ID", help="diffusers model folder or Hub id (default: the mini world model)")
    p.add_argument("--library", metavar="DIR", help="LoRA folder (default: $LORA_COMPOSER_LIBRARY, or the mini world's library)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, metavar="N", help="port (default 7860)")
    p.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB", help=f"largest LoRA upload accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--no-uploads", action="store_true", help="do not offer LoRA uploads")
    args = p.parse_args(argv)
    library = args.library or os.environ.get("LORA_COMPOSER_LIBRARY") or None
    ui = ComposerUI(args.model, library, max_upload_mb=args.max_upload_mb, allow_uploads=not args.no_uploads)
    print(f"lora-composer UI on http://{args.host}:{args.port} (model {ui.model}, library {ui.library})")
    launch(ui, host=args.host, port=args.port)
    return 0
