"""``compose serve --ray`` under load on a local Ray cluster: LoRA-set routing, and a replica killed mid-load.

Two model replicas of the mini world behind the gateway (Ray Serve, HTTP on 127.0.0.1). ``--clients`` threads
send ``--requests`` ``POST /v1/generate``, each with one of ``--sets`` LoRA sets (1 to 3 LoRAs of the library)
and its own prompt, seed and weights, ``--malformed`` of them broken in one field. Reported: the LoRA-set hit
rate (requests whose replica already held their set), how many requests landed on their set's usual replica,
throughput and latency; a second run kills one replica (``ray.kill``) once a third of the requests are answered
and counts requests lost (Serve starts a new replica; the gateway sends the killed one's requests again). Every
valid answer must equal its solo render (8-bit pixels within one level), every malformed one be a 4xx.

    python -m bench.serve_ray [--no-write] [--requests 60] [--clients 8] [--sets 6] [--steps 4] [--replicas 2]
"""

from __future__ import annotations

import collections
import random
import threading
import time

from bench import common, serve_load

NAME = "serve_ray"
COLUMNS = [
    "mode",
    "requests",
    "valid ok",
    "malformed 4xx",
    "lost",
    "LoRA-set hit rate",
    "ideal hit rate",
    "on the set's replica",
    "retries",
    "images/s",
    "p50 (s)",
    "p95 (s)",
    "wall (s)",
]


def make_requests(names: list[str], n: int, sets: int, malformed: float, steps: int, seed: int):
    """serve_load's requests with their LoRAs drawn from ``sets`` fixed sets (weights still vary per request)."""
    rng = random.Random(seed + 1)
    pool = [sorted(rng.sample(names, rng.randint(1, 3))) for _ in range(sets)]
    out = []
    for body, kind in serve_load.make_requests(names, n, malformed, steps, seed):
        if kind is None:
            body["loras"] = [{"name": name, "weight": rng.choice((0.6, 0.8, 1.0))} for name in rng.choice(pool)]
        out.append((body, kind))
    return out


def _gauge(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def measure(url: str, requests, clients: int, solo, library, kill_after: int | None) -> dict:
    import ray

    retries_before = _gauge(url, "lora_composer_ray_retries_total")
    outcomes = [serve_load.Outcome(body, kind) for body, kind in requests]  # filled in as answers come
    killed = []

    def killer():  # once kill_after answers are in, kill the replica that served the first of them
        while sum(o.status != 0 for o in outcomes) < kill_after:
            time.sleep(0.05)
        victim = next(o.headers.get("x-replica") for o in outcomes if o.headers.get("x-replica"))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
        killed.append(victim)

    if kill_after is not None:
        threading.Thread(target=killer, daemon=True).start()
    outcomes, wall = serve_load.run_load(url, requests, clients, outcomes=outcomes)
    serve_load.check(outcomes, solo, library)
    valid = [o for o in outcomes if not o.malformed]
    served = [o for o in valid if o.status == 200]
    states = [o.headers.get("x-lora-set") for o in served]
    by_set = collections.defaultdict(collections.Counter)
    for o in served:
        by_set[tuple(sorted(lo["name"] for lo in o.body["loras"]))][o.headers.get("x-replica")] += 1
    usual = sum(c.most_common(1)[0][1] for c in by_set.values())
    result = serve_load.LoadResult(outcomes, wall, float("nan"), True)
    row = serve_load.row("", result)
    return {
        "requests": len(outcomes),
        "valid ok": row["valid ok"],
        "malformed 4xx": row["malformed 4xx"],
        "lost": sum(o.status != 200 for o in valid),
        "LoRA-set hit rate": states.count("resident") / len(states) if states else float("nan"),
        "ideal hit rate": 1 - len(by_set) / len(served) if served else float("nan"),  # one load per set
        "on the set's replica": f"{usual} of {len(served)}",
        "retries": int(_gauge(url, "lora_composer_ray_retries_total") - retries_before),
        "images/s": row["images/s"],
        "p50 (s)": row["p50 (s)"],
        "p95 (s)": row["p95 (s)"],
        "wall (s)": wall,
        "_killed": killed,
        "_wrong": row["wrong"],
    }


def run(
    tiny: bool,
    argv: list[str],
    requests: int,
    clients: int,
    sets: int,
    steps: int,
    malformed: float,
    replicas: int,
    seed: int,
):
    import ray
    from ray import serve

    from lora_composer.default_model import ensure_default_model
    from lora_composer.library import list_loras
    from lora_composer.pipeline import ComposerPipeline
    from lora_composer.serving.app import ServerConfig
    from lora_composer.serving.ray_serve import RayOptions, build_app, resolved
    from lora_composer.serving.requests import Limits

    if tiny:
        requests, clients = min(requests, 12), min(clients, 3)
    model, library = ensure_default_model()
    solo = ComposerPipeline.from_pretrained(model, library=library)
    names = [p.stem for p in list_loras(library)]
    config = resolved(ServerConfig(limits=Limits(max_steps=50, max_loras=6), max_queue=max(64, requests)))
    port = serve_load.free_port()
    url = f"http://127.0.0.1:{port}"
    import torch

    threads = torch.get_num_threads()  # --threads, for each replica too
    ray.init(
        num_cpus=replicas + 2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
    )
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config, RayOptions(replicas=replicas)), name=NAME, route_prefix="/")
        for mode, kill in (("steady", None), ("one replica killed after a third", requests // 3)):
            reqs = make_requests(names, requests, sets, malformed, steps, seed + len(rows))
            out = measure(url, reqs, clients, solo, library, kill)
            rows.append({"mode": f"{replicas} replicas, {mode}", **out})
            common.log(f"[{NAME}] {rows[-1]}")
    finally:
        serve.shutdown()
        ray.shutdown()
    notes = [
        f"Each request carries one of {sets} LoRA sets; the gateway routes it with Serve's model multiplexing "
        "keyed by the set's file hashes. Hit rate: requests whose replica already held their set (the first "
        "request of a set on a replica loads it); ideal: each set loaded once, on one replica. 'on the set's replica': requests served by the replica that "
        "served most of their set. 'lost': valid requests without their image (must be 0, killed replica "
        "included); every image is compared with its solo render."
    ]
    return common.Result(
        name=NAME,
        title="compose serve --ray on a local Ray cluster",
        columns=COLUMNS,
        rows=rows,
        notes=notes,
        setup=[
            f"Model: the mini world (64x64, {steps} steps), fp32; {replicas} replicas, 1 CPU each, on a local Ray "
            f"cluster on this machine; {requests} requests from {clients} clients per run, {malformed:.0%} malformed"
        ],
        command=common.command(f"bench.{NAME}", argv),
    )


def options(parser) -> None:
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sets", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--malformed", type=float, default=0.1)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None):
    return common.cli(NAME, __doc__, run, argv, options)


if __name__ == "__main__":
    main()
