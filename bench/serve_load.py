"""Load test of ``compose serve`` on loopback: many clients, random LoRA sets, some malformed requests.

The server (the mini world and its library) runs in this process under uvicorn on 127.0.0.1; ``--clients``
threads send ``--requests`` ``POST /v1/generate`` in all, each with 1 to 3 random LoRAs of the library at random
weights, and ``--malformed`` of them broken in one field (an unknown or escaping LoRA name, a bad size, steps
out of range, a wrong type, an unknown field). Every valid answer must be the PNG of its solo render
(``ComposerPipeline`` on a second copy of the model, rendered after the timed phase; 8-bit pixels equal within
one level), every malformed one a 4xx naming the field, and the server must answer health checks after. Run
once with step-level batching and once one request at a time (``--no-batching`` on the server).
``--family flux`` / ``sd3`` serves a tiny FLUX.1 / SD3 pipeline (16x16) with a library of eight random LoRAs
instead, written to a section of its own.

    python -m bench.serve_load [--no-write] [--requests 200] [--clients 8] [--steps 4] [--malformed 0.1]
                               [--family miniworld|flux|sd3]
"""

from __future__ import annotations

import io
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bench import common

NAME = "serve_load"
COLUMNS = [
    "mode",
    "requests",
    "valid ok",
    "malformed 4xx",
    "wrong",
    "images/s",
    "p50 (s)",
    "p95 (s)",
    "mean requests per denoiser pass",
    "wall (s)",
]
PROMPTS = ["a {c} {s} on a {b} background", "{s}, {b} background", "blinky and a {s}", "a {c} {s}"]
COLOURS, SHAPES, BACKGROUNDS = (
    ("red", "green", "blue", "yellow"),
    ("circle", "square", "triangle"),
    ("plain", "striped", "dotted"),
)
MALFORMED = (
    "unknown lora",
    "escaping lora",
    "absolute lora",
    "odd width",
    "steps 0",
    "steps over limit",
    "weight not a number",
    "unknown field",
    "empty prompt",
    "too many loras",
)


@dataclass
class Outcome:
    body: dict
    malformed: str | None
    status: int = 0
    seconds: float = 0.0
    png: bytes | None = None
    error: str = ""
    ok: bool | None = None
    headers: dict = field(default_factory=dict)


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    wall_s: float
    batch_mean: float
    healthy: bool
    rows: dict = field(default_factory=dict)


def make_requests(
    names: list[str], n: int, malformed: float, steps: int, seed: int, size: int = 64
) -> list[tuple[dict, str | None]]:
    """``n`` request bodies (deterministic for ``seed``), about ``malformed`` of them broken in one field."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        picks = rng.sample(names, rng.randint(1, 3))
        body = {
            "prompt": rng.choice(PROMPTS).format(
                c=rng.choice(COLOURS), s=rng.choice(SHAPES), b=rng.choice(BACKGROUNDS)
            ),
            "loras": [{"name": p, "weight": rng.choice((0.6, 0.8, 1.0))} for p in picks],
            "seed": rng.randrange(10_000),
            "steps": steps,
            "width": size,
            "height": size,
        }
        kind = None
        if rng.random() < malformed:
            kind = MALFORMED[i % len(MALFORMED)]
            if kind == "unknown lora":
                body["loras"][0]["name"] = "no-such-lora"
            elif kind == "escaping lora":
                body["loras"][0]["name"] = "../../../etc/passwd"
            elif kind == "absolute lora":
                body["loras"][0]["name"] = "/etc/hostname"
            elif kind == "odd width":
                body["width"] = size + 1
            elif kind == "steps 0":
                body["steps"] = 0
            elif kind == "steps over limit":
                body["steps"] = 10_000
            elif kind == "weight not a number":
                body["loras"][0]["weight"] = "heavy"
            elif kind == "unknown field":
                body["sampler_typo"] = "euler"
            elif kind == "empty prompt":
                body["prompt"] = "  "
            elif kind == "too many loras":
                body["loras"] = [{"name": n} for n in names] * 2
        out.append((body, kind))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A ``compose serve`` app under uvicorn on 127.0.0.1 in a background thread (``with`` stops it)."""

    def __init__(self, server, token: str | None = None):
        import uvicorn

        from lora_composer.serving.app import create_app

        self.server = server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(server), host="127.0.0.1", port=self.port, log_level="error")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.uvicorn.should_exit = True
        self.thread.join(60)
        return False


def run_load(
    url: str,
    requests: list[tuple[dict, str | None]],
    clients: int,
    timeout: float = 600,
    outcomes: list[Outcome] | None = None,
) -> tuple[list[Outcome], float]:
    """Send every request from ``clients`` threads (each takes the next one when its last is answered);
    ``outcomes``: the list to fill in (others may watch it), else a new one."""
    import httpx

    outcomes = [Outcome(body, kind) for body, kind in requests] if outcomes is None else outcomes
    index = iter(range(len(outcomes)))
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while True:
                with lock:
                    i = next(index, None)
                if i is None:
                    return
                o = outcomes[i]
                start = time.perf_counter()
                r = http.post("/v1/generate", json=o.body)
                o.seconds = time.perf_counter() - start
                o.headers = {k.lower(): v for k, v in r.headers.items()}
                o.status = r.status_code
                if r.status_code == 200:
                    o.png = r.content
                else:
                    o.error = (
                        r.json().get("error", "")
                        if r.headers.get("content-type", "").startswith("application/json")
                        else r.text
                    )

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - start


_SOLO: dict[str, np.ndarray] = {}


def solo_image(solo, library, body: dict) -> np.ndarray:
    """The 8-bit image ComposerPipeline renders alone for ``body`` (rendered once per body)."""
    import json

    key = json.dumps(body, sort_keys=True)
    if key not in _SOLO:
        _SOLO[key] = _render_solo(solo, library, body)
    return _SOLO[key]


def _render_solo(solo, library, body: dict) -> np.ndarray:
    loras = [(str(library / f"{lo['name']}.safetensors"), lo.get("weight", 1.0)) for lo in body["loras"]]
    image = solo(
        body["prompt"],
        loras=loras,
        num_inference_steps=body["steps"],
        seed=body["seed"],
        height=body["height"],
        width=body["width"],
        progress=False,
    )[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def check(outcomes: list[Outcome], solo, library) -> None:
    """Mark each outcome right or wrong against its solo render (valid) or its expected refusal (malformed)."""
    from PIL import Image

    for o in outcomes:
        if o.malformed:
            one_line = bool(o.error) and "\n" not in o.error and ":" in o.error
            o.ok = 400 <= o.status < 500 and o.status != 429 and one_line
            continue
        if o.status != 200 or o.png is None:
            o.ok = False
            continue
        got = np.asarray(Image.open(io.BytesIO(o.png)).convert("RGB"), dtype=np.int16)
        o.ok = bool(np.abs(got - solo_image(solo, library, o.body)).max() <= 1)


def measure(composer, solo, library, requests, clients: int, batching: bool, max_batch: int = 8) -> LoadResult:
    from lora_composer.serving.app import Server, ServerConfig
    from lora_composer.serving.requests import Limits

    composer.unload_all()
    config = ServerConfig(
        limits=Limits(max_steps=50, max_loras=6),
        max_queue=max(64, len(requests)),
        max_batch=max_batch,
        batching=batching,
    )
    server = Server(config, composer=composer)
    import httpx

    with Running(server) as running:
        outcomes, wall = run_load(running.url, requests, clients)
        healthy = httpx.get(running.url + "/v1/health", timeout=10).json().get("status") == "ok"
    hist = server.metrics.batch_requests
    batch_mean = hist.total / hist.n if hist.n else 1.0
    check(outcomes, solo, library)
    return LoadResult(outcomes, wall, batch_mean, healthy)


def row(mode: str, result: LoadResult) -> dict:
    valid = [o for o in result.outcomes if not o.malformed]
    bad = [o for o in result.outcomes if o.malformed]
    times = sorted(o.seconds for o in valid if o.status == 200)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))] if times else float("nan")
    return {
        "mode": mode,
        "requests": len(result.outcomes),
        "valid ok": f"{sum(bool(o.ok) for o in valid)} of {len(valid)}",
        "malformed 4xx": f"{sum(bool(o.ok) for o in bad)} of {len(bad)}",
        "wrong": sum(not o.ok for o in result.outcomes),
        "images/s": len(times) / result.wall_s,
        "p50 (s)": statistics.median(times) if times else float("nan"),
        "p95 (s)": q(0.95),
        "mean requests per denoiser pass": result.batch_mean,
        "wall (s)": result.wall_s,
    }


DIT_SIZE = 16  # the tiny FLUX.1 / SD3 pipelines' size (pixels per side)


def _world(family: str, folder):
    """``(serving composer, solo composer, library, size, setup line)`` for ``family``."""
    import copy

    from lora_composer.pipeline import ComposerPipeline

    if family == "miniworld":
        from lora_composer.default_model import ensure_default_model

        model, library = ensure_default_model()
        return (
            ComposerPipeline.from_pretrained(model, library=library),
            ComposerPipeline.from_pretrained(model, library=library),
            library,
            64,
            "Model: the mini world (64x64, guidance 5)",
        )
    from lora_composer import tiny_dit

    pipe = tiny_dit.build_tiny_flux_pipeline(seed=0) if family == "flux" else tiny_dit.build_tiny_sd3_pipeline(seed=0)
    text = ("text_encoder", "text_encoder_2") if family == "sd3" else ("text_encoder",)
    library = folder / "loras"
    for i in range(8):  # more than the server's 6 per request, for the "too many loras" case
        layers = tiny_dit.random_dit_lora_layers(pipe, seed=i + 1, text_encoders=text)
        tiny_dit.save_dit_diffusers_lora(pipe, layers, library / f"lora-{i + 1}.safetensors", rank=4)
    composer = ComposerPipeline(pipe, library=library)
    label = {"flux": "FLUX.1 (guidance 3.5, one row per image)", "sd3": "SD3 (guidance 7, CFG rows)"}[family]
    return (
        composer,
        ComposerPipeline(copy.deepcopy(pipe), library=library),
        library,
        DIT_SIZE,
        f"Model: a tiny {label}, {DIT_SIZE}x{DIT_SIZE}, a library of eight random rank-4 LoRAs",
    )


def run(
    tiny: bool,
    argv: list[str],
    requests: int,
    clients: int,
    steps: int,
    malformed: float,
    seed: int,
    family: str = "miniworld",
):
    import tempfile
    from pathlib import Path

    from lora_composer.library import list_loras

    if tiny:
        requests, clients = min(requests, 12), min(clients, 3)
    with tempfile.TemporaryDirectory() as folder:
        composer, solo, library, size, model = _world(family, Path(folder))
        names = [p.stem for p in list_loras(library)]
        reqs = make_requests(names, requests, malformed, steps, seed, size=size)
        rows = []
        for mode, batching in (("batched (step-level, up to 8 requests per pass)", True), ("one at a time", False)):
            result = measure(composer, solo, library, reqs, clients, batching)
            rows.append(row(mode, result))
            common.log(f"[{NAME}] {rows[-1]}")
            if not result.healthy:
                raise RuntimeError("the server stopped answering health checks")
    speed = rows[0]["images/s"] / rows[1]["images/s"]
    notes = [
        f"Step-level batching serves {speed:.2f}x the images per second of one request at a time here; every "
        "valid answer is checked against its solo render, every malformed one must be a 4xx whose one-line "
        "error names the field ('wrong' counts those that are not)."
    ]
    return common.Result(
        name=NAME if family == "miniworld" else f"{NAME}_{family}",
        title="compose serve under load (loopback)" + ("" if family == "miniworld" else f", tiny {family}"),
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            f"{model}, {steps} steps, fp32; {requests} requests from {clients} concurrent clients, 1-3 random "
            f"LoRAs of its library each, {malformed:.0%} malformed; server and clients in one process (uvicorn "
            "on 127.0.0.1)"
        ],
        command=common.command(f"bench.{NAME}", argv),
    )


def options(parser) -> None:
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--malformed", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--family",
        choices=("miniworld", "flux", "sd3"),
        default="miniworld",
        help="the model served: the mini world, or a tiny FLUX.1 / SD3 pipeline",
    )


def main(argv: list[str] | None = None):
    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
