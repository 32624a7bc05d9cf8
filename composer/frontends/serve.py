"""``compose serve``: the HTTP API over one model and its LoRA library (see :mod:`lora_composer.serving.app`).

    compose serve                                   # the mini world on http://127.0.0.1:8000 (docs at /docs)
    compose serve --model DIR_OR_ID --library DIR --host 0.0.0.0 --token-file FILE

It binds 127.0.0.1 unless ``--host`` says otherwise; any other address needs a bearer token
(``--token-file`` or ``$LORA_COMPOSER_TOKEN``). Ctrl-C stops accepting requests and finishes those accepted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lora_composer.frontends.args import (
    Parser,
    UsageError,
    add_device_args,
    add_log_args,
    command,
    configure_logging,
    is_loopback,
)


def read_token(args) -> str | None:
    if args.token_file:
        text = Path(args.token_file).expanduser().read_text(encoding="utf-8").strip()
        if not text:
            raise UsageError(f"--token-file {args.token_file}: the file is empty")
        return text
    return os.environ.get("LORA_COMPOSER_TOKEN") or None


def parser() -> Parser:
    from lora_composer.serving.requests import Limits

    d = Limits()
    p = Parser(prog="compose serve", description="Serve text-to-image renders with many LoRAs over HTTP (FastAPI).")
    p.add_argument(
        "--model", "-m", metavar="DIR_OR_ID", help="diffusers model folder or Hub id (default: the mini world)"
    )
    p.add_argument(
        "--library", metavar="DIR", help="LoRA folder (default: $LORA_COMPOSER_LIBRARY, or the mini world's)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", metavar="ADDR", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port (default 8000)")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer token clients must send (else $LORA_COMPOSER_TOKEN); required when binding other than loopback",
    )
    p.add_argument("--max-queue", type=int, default=32, metavar="N", help="waiting requests before 429 (default 32)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests per denoiser batch (default 8)")
    p.add_argument("--no-batching", action="store_true", help="run requests one at a time")
    p.add_argument(
        "--max-steps", type=int, default=d.max_steps, metavar="N", help=f"per request (default {d.max_steps})"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        metavar="N",
        help=f"width x height per request (default {d.max_pixels})",
    )
    p.add_argument(
        "--max-loras", type=int, default=d.max_loras, metavar="N", help=f"LoRAs per request (default {d.max_loras})"
    )
    p.add_argument(
        "--cache-mb", type=int, default=2048, metavar="MB", help="parsed LoRAs kept in host memory (default 2048)"
    )
    p.add_argument(
        "--resident-mb",
        type=int,
        default=1024,
        metavar="MB",
        help="attached LoRAs' factors before the least recently used are detached (default 1024)",
    )
    p.add_argument(
        "--max-resident",
        type=int,
        default=64,
        metavar="N",
        help="attached LoRAs before the least recently "
        "used are detached; on the CPU every layer's stack is reserved for this many (default 64)",
    )
    p.add_argument(
        "--drain-s", type=float, default=60.0, metavar="S", help="at shutdown, time given to accepted requests"
    )
    p.add_argument(
        "--jobs-url",
        default="",
        metavar="URL",
        help="where accepted /v1/jobs requests are kept, so a restart "
        "answers them and runs the unfinished ones again: a SQLite file (default: serve/jobs-PORT.sqlite in "
        "the data folder), redis://HOST:PORT/DB (pip install 'lora-composer[redis]'), or none (memory only)",
    )
    add_log_args(p, default="info")
    add_device_args(p)  # with --ray, "auto" is resolved on each replica (a GPU replica runs on cuda)
    ray = p.add_argument_group("Ray Serve (pip install 'ray[serve]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve replicas, requests routed to the replica that holds their LoRA set",
    )
    ray.add_argument("--replicas", type=int, default=2, metavar="N", help="model replicas (default 2; one per GPU)")
    ray.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="an existing Ray cluster (auto, ray://HOST:10001); default: start one on this machine",
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each replica holds (1 on a GPU cluster; --device auto then runs each replica on its GPU)",
    )
    return p


@command("compose serve")
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_level)
    token = read_token(args)
    if not is_loopback(args.host) and not token:
        raise UsageError(
            f"--host {args.host} is reachable from other machines: set a bearer token "
            "(--token-file FILE or $LORA_COMPOSER_TOKEN)"
        )
    for name in ("port", "max_queue", "max_batch", "max_steps", "max_pixels", "max_loras", "max_resident", "replicas"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    import uvicorn

    from lora_composer.serving.app import Server, ServerConfig, create_app
    from lora_composer.serving.job_store import open_store, resolve_url
    from lora_composer.serving.requests import Limits

    config = ServerConfig(
        model=args.model,
        library=args.library or os.environ.get("LORA_COMPOSER_LIBRARY") or None,
        token=token,
        limits=Limits(
            max_steps=args.max_steps,
            max_pixels=args.max_pixels,
            max_loras=args.max_loras,
            default_steps=min(20, args.max_steps),
        ),
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batching=not args.no_batching,
        cache_mb=args.cache_mb,
        resident_mb=args.resident_mb,
        max_resident=args.max_resident,
        drain_s=args.drain_s,
        device=args.device,
        dtype=args.dtype,
        jobs_url=resolve_url(args.jobs_url, args.port),
    )
    if config.jobs_url:  # a store that cannot be opened is said in one line before the model loads
        open_store(config.jobs_url).close()
    if args.ray:
        return serve_on_ray(args, config)
    server = Server(config)
    print(
        f"lora-composer serving on http://{args.host}:{args.port} (model {server.composer.model}, library "
        f"{server.names.library}; API page /docs)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        create_app(server),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(args.drain_s) + 5,
    )
    return 0


def serve_on_ray(args, config) -> int:
    """Deploy the gateway and ``--replicas`` model replicas on Ray Serve, then wait for Ctrl-C."""
    import time

    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError("--ray needs Ray Serve: pip install 'ray[serve]'") from None
    from lora_composer.serving.ray_serve import RayOptions, build_app, resolved

    config = resolved(config)
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    options = RayOptions(replicas=args.replicas, gpus_per_replica=args.gpus_per_replica)
    serve.run(build_app(config, options), name="lora-composer", route_prefix="/")
    print(
        f"lora-composer serving on http://{args.host}:{args.port} through Ray Serve ({args.replicas} replicas of "
        f"{config.model}, library {config.library}; API page /docs)",
        file=sys.stderr,
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # replicas finish what they accepted (up to --drain-s)
    return 0
