"""A render request's life on the server: queued, running, then done, failed or cancelled.

Its events (``queued``, ``started``, ``step``, ``done``/``failed``/``cancelled``) are kept in order so that a
client following ``/v1/jobs/{id}/events`` late still sees the whole story; the PNG stays until the job is
forgotten (the server keeps the most recent ones).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

FINAL = ("done", "failed", "cancelled")


@dataclass
class RenderSpec:
    """One validated request: every field checked, LoRA names already confined to the library."""

    prompt: str
    negative_prompt: str = ""
    loras: list[tuple[Path, float]] | str = field(default_factory=list)  # [(file, weight)] or "auto"
    text_weights: dict[str, float] = field(default_factory=dict)  # file -> text-encoder weight, where not the weight
    strategy: str = "merge"
    strategy_args: dict = field(default_factory=dict)
    seed: int = 0
    steps: int = 20
    width: int = 64
    height: int = 64
    guidance: float = 5.0
    scheduler: str = ""  # a diffusers scheduler class name; "" for the model's own
    region_loras: list[Path] = field(default_factory=list)  # regional: files tagged in the prompt's regions

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one denoiser batch (same latent shape and sampler)."""
        return (self.width, self.height, self.scheduler)


class Cancelled(Exception):
    """The job was cancelled by its client or by a shutdown."""


_counter = itertools.count(1)


class Job:
    def __init__(self, spec: RenderSpec, job_id: str | None = None):
        self.id = job_id or f"{next(_counter):06d}-{secrets.token_hex(4)}"  # a stored job keeps its id on a rerun
        self.spec = spec
        self.status = "queued"
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.events: list[dict] = []
        self.png: bytes | None = None
        self.array = None  # the image as floats (batched renders), for comparing with a solo render
        self.record = None
        self.error: str | None = None
        self.http_status = 200
        self.cancel = threading.Event()
        self._cond = threading.Condition()
        self._listeners: list = []  # called (no arguments) after every event, from the thread that emitted it
        self.batched_with = 0  # the most other requests that shared a denoiser batch with this one
        self.emit("queued")

    def emit(self, kind: str, **data) -> None:
        with self._cond:
            self.events.append({"event": kind, "job": self.id, **data})
            self._cond.notify_all()
            listeners = list(self._listeners)
        for fn in listeners:
            fn()

    def subscribe(self, fn) -> None:
        """Call ``fn()`` after each event from now on (an async server wakes its waiters with it)."""
        with self._cond:
            self._listeners.append(fn)

    def unsubscribe(self, fn) -> None:
        with self._cond:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def start(self) -> None:
        self.status, self.started = "running", time.monotonic()
        self.emit("started")

    def finish(
        self, status: str, png: bytes | None = None, record=None, error: str | None = None, http_status: int = 200
    ) -> None:
        if self.status in FINAL:
            return
        self.png, self.record, self.error, self.http_status = png, record, error, http_status
        self.finished = time.monotonic()
        self.status = status
        data = {"error": error} if error else {}
        self.emit(status, **data)

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is final (True) or ``timeout`` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def events_after(self, index: int, timeout: float) -> list[dict]:
        """Events from ``index`` on, waiting up to ``timeout`` seconds for one when there are none yet."""
        with self._cond:
            if len(self.events) <= index and not self.done:
                self._cond.wait(timeout)
            return list(self.events[index:])

    def summary(self) -> dict:
        out = {
            "id": self.id,
            "status": self.status,
            "steps": self.spec.steps,
            "step": max((e.get("step", 0) for e in self.events if e["event"] == "step"), default=0),
        }
        if self.error:
            out["error"] = self.error
        if self.status == "done":
            out["result"] = f"/v1/jobs/{self.id}/result"
        return out
