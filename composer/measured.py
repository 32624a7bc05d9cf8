"""What each strategy measured, read from the results that ``compose eval --record`` writes.

``compose --help``, the web UI's strategy hint and ``--strategy auto`` quote these figures, so no figure is
typed into code: the package ships one record file per mini world (``results/<world>.json``), each holding
the runs recorded into it (the command, its seed, its protocol and every strategy's summary, as
``results.json`` has them). A line quotes the recorded run with the most pictures of that strategy beside
merge's figure from the same run, so a reader compares like with like.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WORLDS = ("one-object", "community", "two-objects")  # the order lines are quoted in


def record(path: Path, result: dict, command: str, world: str) -> None:
    """Add one ``compose eval`` run (its ``results.json`` dict) to the record file ``path``."""
    strategies = {
        name: {k: v for k, v in summary.items() if k != "by_combination"}
        for name, summary in result.get("strategies", {}).items()
    }
    run = {
        "command": command,
        "seed": result.get("protocol", {}).get("seed"),
        "protocol": result.get("protocol", {}),
        "strategies": strategies,
    }
    data = json.loads(path.read_text()) if path.exists() else {"world": world, "runs": []}
    if data.get("world") != world:
        raise ValueError(f"{path} records the {data.get('world')!r} world, not {world!r}")
    data["runs"].append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    runs.cache_clear()


@lru_cache(maxsize=None)
def runs(world: str) -> tuple[dict, ...]:
    """The runs recorded for ``world`` in the package (none when the file is missing)."""
    path = RESULTS / f"{world}.json"
    return tuple(json.loads(path.read_text())["runs"]) if path.exists() else ()


def best_run(world: str, strategy: str) -> dict | None:
    """The recorded run of ``world`` with the most pictures of ``strategy`` (the later one on a tie)."""
    found = [r for r in runs(world) if strategy in r["strategies"]]
    return max(reversed(found), key=lambda r: r["strategies"][strategy].get("images") or 0, default=None)


def _rates(summary: dict) -> dict[str, float]:
    """Size (or two-object kind) -> all-concepts rate."""
    return {k: v for k, v in (summary.get("by_size") or summary.get("by_kind") or {}).items() if v is not None}


def world_line(world: str, strategy: str) -> str | None:
    """``"community world, seed 3000, 25 pictures: all concepts 0.35 / 0.20 at 3 / 4 LoRAs (merge 0.40 / 0.25)"``,
    or None."""
    run = best_run(world, strategy)
    if run is None:
        return None
    mine = _rates(run["strategies"][strategy])
    sizes = [k for k in sorted(mine) if k != "1"][-2:] if world != "two-objects" else sorted(mine)[:2]
    if not sizes:
        return None
    unit = "LoRAs" if world != "two-objects" else "(two-object kinds)"
    line = (
        f"{world} world, seed {run['seed']}, {run['strategies'][strategy].get('images') or 0} pictures: all concepts {' / '.join(f'{mine[k]:.2f}' for k in sizes)} at "
        f"{' / '.join(sizes)} {unit}"
    )
    merge = _rates(run["strategies"].get("merge", {}))
    if strategy != "merge" and all(k in merge for k in sizes):
        line += f" (merge {' / '.join(f'{merge[k]:.2f}' for k in sizes)})"
    return line


def line(strategy: str) -> str:
    """What ``strategy`` measured in every world that recorded it, one line; says so when none did."""
    parts = [text for world in WORLDS if (text := world_line(world, strategy))]
    return "; ".join(parts) if parts else "not measured on the mini worlds yet"


BASE_KEPT = 0.05  # how much base-concept confidence below merge's a pick may lose (it must not wreck the picture)


def best(world: str, size: int, candidates) -> str | None:
    """The candidate with the highest all-concepts rate at ``size`` LoRAs in ``world``'s best-sampled run that
    measured merge, among those that keep the base model's named concepts (base-concept confidence at most
    :data:`BASE_KEPT` below merge's) and beat merge by more than one picture; None when nothing is recorded."""
    run = best_run(world, "merge")
    if run is None:
        return None
    floor = (run["strategies"]["merge"].get("base_confidence") or 0.0) - BASE_KEPT
    scores = {
        name: _rates(s).get(str(size))
        for name, s in run["strategies"].items()
        if name in set(candidates) and (s.get("base_confidence") is None or s["base_confidence"] >= floor)
    }
    scores = {k: v for k, v in scores.items() if v is not None}
    if not scores:
        return None
    # a lead over merge of one picture is noise: another strategy must beat it by more than one picture's share
    per_size = (run["strategies"]["merge"].get("images") or 1) / max(1, len(_rates(run["strategies"]["merge"])))
    if "merge" in scores:
        scores = {k: v for k, v in scores.items() if k == "merge" or v > scores["merge"] + 1.0 / per_size + 1e-9}
    return max(scores, key=lambda k: (scores[k], k == "merge"))


def auto(world: str, loras: int, regions: bool, candidates) -> tuple[str, str]:
    """``--strategy auto``: ``(strategy, why)``. Regional when the prompt has regions; otherwise the strategy with
    the best all-concepts rate at that many LoRAs (2 to 4, the sizes measured) in the model's world's recorded
    runs; merge for a model no world measured, or one LoRA or none."""
    if regions:
        return "regional", "the prompt has regions (BREAK)"
    if loras < 2:
        return "merge", f"{loras} LoRA{'' if loras == 1 else 's'}: nothing to compose"
    size = min(max(loras, 2), 4)
    name = best(world, size, candidates) if world else None
    if name is None:
        where = f"in the {world} world at {size} LoRAs" if world and runs(world) else "for this model"
        return "merge", f"no measurement {where}: merge, the baseline"
    run = best_run(world, "merge")
    return name, f"the best in the {world} world at {size} LoRAs (seed {run['seed']})"
