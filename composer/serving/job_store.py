"""The job table that outlives the server: every accepted ``/v1/jobs`` request, its state and its image.

``compose serve`` (and its Ray gateway) writes each job here when it accepts it, with the request as the client
sent it but its seed fixed, then its state as it changes and, once done, its PNG. After a restart,
``GET /v1/jobs/{id}`` answers from the store, and every job accepted but not finished is run again: its seed
was fixed before it was stored, so the image is the one the first run would have made.

Two stores speak the same interface (:class:`JobStore`):

- :class:`SQLiteJobStore`: a file (standard library ``sqlite3``, WAL journal), the image a BLOB in its row;
- :class:`RedisJobStore`: a Redis server (``pip install 'lora-composer[redis]'``), a hash per job.

:func:`open_store` picks one from ``--jobs-url``. Nothing is pickled: the request is JSON, the image PNG bytes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from lora_composer.errors import ComposerError, one_line

log = logging.getLogger(__name__)

FINAL = ("done", "failed", "cancelled")
UNFINISHED = ("queued", "running")
KEEP = 1000  # finished jobs kept (the oldest finished are forgotten first); unfinished ones are always kept


class JobStoreError(ComposerError):
    """The job store cannot be opened or used: ``--jobs-url`` and the cause, in one line."""


@dataclass
class JobRecord:
    """One job as the store keeps it. ``request`` is the request body (JSON-able) with its seed fixed."""

    id: str
    request: dict
    status: str = "queued"
    steps: int = 0
    step: int = 0
    error: str | None = None
    http_status: int = 200
    replica: str | None = None
    lora_set: str | None = None
    png: bytes | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    retry_after = None  # answers read it as they read a live job's

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def summary(self) -> dict:
        """The same shape as :meth:`Job.summary`."""
        out = {"id": self.id, "status": self.status, "steps": self.steps, "step": self.step}
        if self.error:
            out["error"] = self.error
        if self.status == "done":
            out["result"] = f"/v1/jobs/{self.id}/result"
        return out


COLUMNS = [f.name for f in fields(JobRecord)]
UPDATABLE = set(COLUMNS) - {"id", "created"}


class JobStore:
    """``put`` a new job, ``get`` it back, ``update`` some of its fields, list the ``unfinished`` ones (oldest
    first). Safe to call from several threads; every write is durable when it returns."""

    url = ""

    def put(self, record: JobRecord) -> None:
        raise NotImplementedError

    def get(self, job_id: str) -> JobRecord | None:
        raise NotImplementedError

    def update(self, job_id: str, **values) -> bool:
        """Set ``values`` on the job (False when there is no such job)."""
        raise NotImplementedError

    def unfinished(self) -> list[JobRecord]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _checked(self, values: dict) -> dict:
        unknown = set(values) - UPDATABLE
        if unknown:
            raise KeyError(f"not a field of a stored job: {', '.join(sorted(unknown))}")
        return {**values, "updated": values.get("updated", time.time())}


class SQLiteJobStore(JobStore):
    """The job table in one SQLite file (the image as a BLOB in its row)."""

    def __init__(self, path: str | Path, keep: int = KEEP):
        self.path = Path(path).expanduser()
        self.url = str(self.path)
        self.keep = keep
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")  # a restarted server may open it while the old one ends
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, request TEXT NOT NULL, status TEXT NOT NULL, "
                "steps INTEGER, step INTEGER, error TEXT, http_status INTEGER, replica TEXT, lora_set TEXT, "
                "png BLOB, created REAL, updated REAL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created)")
        except (sqlite3.Error, OSError) as exc:
            raise JobStoreError(f"jobs-url {self.path}: cannot open the job store: {one_line(exc)}") from None

    def _run(self, sql: str, args=()) -> list:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise JobStoreError(f"jobs-url {self.path}: {one_line(exc)}") from None

    @staticmethod
    def _row(row) -> JobRecord:
        values = dict(zip(COLUMNS, row))
        values["request"] = json.loads(values["request"])
        if values["png"] is not None:
            values["png"] = bytes(values["png"])
        return JobRecord(**values)

    def put(self, record: JobRecord) -> None:
        values = [getattr(record, c) for c in COLUMNS]
        values[COLUMNS.index("request")] = json.dumps(record.request)
        self._run(
            f"INSERT OR REPLACE INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", values
        )

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._run(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return self._row(rows[0]) if rows else None

    def update(self, job_id: str, **values) -> bool:
        values = self._checked(values)
        if "request" in values:
            values["request"] = json.dumps(values["request"])
        with self._lock:
            try:
                changed = self._db.execute(
                    f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?", [*values.values(), job_id]
                ).rowcount
                if changed and values.get("status") in FINAL:
                    self._db.execute(
                        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status IN ('done', 'failed', "
                        "'cancelled') ORDER BY updated DESC LIMIT -1 OFFSET ?)",
                        (self.keep,),
                    )
            except sqlite3.Error as exc:
                raise JobStoreError(f"jobs-url {self.path}: {one_line(exc)}") from None
        return bool(changed)

    def unfinished(self) -> list[JobRecord]:
        rows = self._run(
            f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE status IN ('queued', 'running') ORDER BY created, rowid"
        )
        return [self._row(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisJobStore(JobStore):
    """The job table on a Redis server: a hash per job (the image as bytes in its ``png`` field), a sorted set
    of the unfinished ones (by creation) and one of the finished ones (by last change, for forgetting)."""

    def __init__(self, url: str, keep: int = KEEP, client=None, prefix: str = "lora-composer:jobs:"):
        self.url = url
        self.keep = keep
        self.prefix = prefix
        if client is None:
            try:
                import redis
            except ImportError:
                raise JobStoreError(
                    f"jobs-url {url}: a Redis job store needs the redis client: pip install 'lora-composer[redis]'"
                ) from None
            try:
                client = redis.Redis.from_url(url)
                client.ping()
            except Exception as exc:  # noqa: BLE001 (a bad URL or an unreachable server: one line either way)
                raise JobStoreError(f"jobs-url {url}: cannot reach the Redis server: {one_line(exc)}") from None
        self.r = client

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}"

    @staticmethod
    def _encode(values: dict) -> tuple[dict, list]:
        """(fields to set, fields to delete): None is stored as an absent field."""
        out, gone = {}, []
        for k, v in values.items():
            if v is None:
                gone.append(k)
            elif k == "request":
                out[k] = json.dumps(v)
            else:
                out[k] = v if isinstance(v, bytes) else str(v)
        return out, gone

    @staticmethod
    def _decode(job_id: str, raw: dict) -> JobRecord:
        values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in values.items() if k != "png"}
        return JobRecord(
            id=job_id,
            request=json.loads(text["request"]),
            status=text["status"],
            steps=int(text.get("steps", 0)),
            step=int(text.get("step", 0)),
            error=text.get("error"),
            http_status=int(text.get("http_status", 200)),
            replica=text.get("replica"),
            lora_set=text.get("lora_set"),
            png=bytes(values["png"]) if values.get("png") is not None else None,
            created=float(text.get("created", 0)),
            updated=float(text.get("updated", 0)),
        )

    def _call(self, fn):
        try:
            return fn()
        except JobStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 (the server went away, out of memory...: one line)
            raise JobStoreError(f"jobs-url {self.url}: {one_line(exc)}") from None

    def _prune(self) -> None:
        """Forget the oldest finished jobs past ``keep``."""
        old = self.r.zrange(self.prefix + ":finished", 0, -(self.keep + 1))
        if old:
            pipe = self.r.pipeline(transaction=True)
            for job_id in old:
                job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
                pipe.delete(self._key(job_id))
                pipe.zrem(self.prefix + ":finished", job_id)
            pipe.execute()

    def put(self, record: JobRecord) -> None:
        values, _ = self._encode({c: getattr(record, c) for c in COLUMNS if c != "id"})

        def write():
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(self._key(record.id))
            pipe.hset(self._key(record.id), mapping=values)
            if record.done:
                pipe.zrem(self.prefix + ":unfinished", record.id)
                pipe.zadd(self.prefix + ":finished", {record.id: record.updated})
            else:
                pipe.zadd(self.prefix + ":unfinished", {record.id: record.created})
            pipe.execute()

        self._call(write)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self._call(lambda: self.r.hgetall(self._key(job_id)))
        return self._decode(job_id, raw) if raw else None

    def update(self, job_id: str, **values) -> bool:
        values = self._checked(values)
        setting, gone = self._encode(values)

        def write():
            if not self.r.exists(self._key(job_id)):
                return False
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self._key(job_id), mapping=setting)
            if gone:
                pipe.hdel(self._key(job_id), *gone)
            if values.get("status") in FINAL:
                pipe.zrem(self.prefix + ":unfinished", job_id)
                pipe.zadd(self.prefix + ":finished", {job_id: values["updated"]})
            elif values.get("status") in UNFINISHED:
                pipe.zrem(self.prefix + ":finished", job_id)
                pipe.zadd(self.prefix + ":unfinished", {job_id: float(self.r.hget(self._key(job_id), "created") or 0)})
            pipe.execute()
            if values.get("status") in FINAL:
                self._prune()
            return True

        return bool(self._call(write))

    def unfinished(self) -> list[JobRecord]:
        ids = self._call(lambda: self.r.zrange(self.prefix + ":unfinished", 0, -1))
        out = []
        for job_id in ids:
            record = self.get(job_id.decode() if isinstance(job_id, bytes) else job_id)
            if record is not None and not record.done:
                out.append(record)
        return out

    def close(self) -> None:
        self._call(self.r.close)


def default_path(port: int | None = None) -> Path:
    """The server's own job file in the data folder (one per port, so two servers do not run each other's)."""
    from lora_composer.cache import data_dir

    return data_dir() / "serve" / (f"jobs-{port}.sqlite" if port else "jobs.sqlite")


def resolve_url(url: str | None, port: int | None = None) -> str | None:
    """``--jobs-url`` as a server takes it: ``""``/None the default file, ``none`` no store (jobs in memory
    only), ``redis://...`` as given, a path or ``sqlite:///PATH`` an absolute path."""
    if url is None or url == "":
        return str(default_path(port).resolve())
    if url.lower() in ("none", "off", "memory"):
        return None
    if url.startswith(("redis://", "rediss://", "unix://")):
        return url
    if url.startswith("sqlite://"):
        url = url[len("sqlite://") :]
    if "://" in url:
        raise JobStoreError(
            f"jobs-url {url}: not a store this server knows (a file path, sqlite:///PATH, redis://HOST:PORT/DB or none)"
        )
    return str(Path(url).expanduser().resolve())


def open_store(url: str, keep: int = KEEP) -> JobStore:
    """The store ``url`` names (see :func:`resolve_url`)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisJobStore(url, keep=keep)
    if url.startswith("sqlite://"):
        url = url[len("sqlite://") :]
    if "://" in url:
        raise JobStoreError(
            f"jobs-url {url}: not a store this server knows (a file path, sqlite:///PATH, redis://HOST:PORT/DB or none)"
        )
    return SQLiteJobStore(url, keep=keep)


class Recorder:
    """Writes a live :class:`~lora_composer.serving.jobs.Job`'s state into the store as its events arrive
    (subscribed to the job: called from whichever thread emits). A job cancelled by a shutdown (HTTP 503)
    stays unfinished in the store, to be run again at the next start; a client's cancel is final."""

    STEP_EVERY_S = 0.5  # step counts are written at most this often (states and the image always)

    def __init__(self, store: JobStore, job, record_id: str | None = None):
        self.store = store
        self.job = job
        self.id = record_id or job.id
        self._lock = threading.Lock()
        self._status = job.status
        self._step = 0
        self._written = 0.0
        self._closed = False
        job.subscribe(self)

    def __call__(self) -> None:
        job = self.job
        with self._lock:
            if self._closed:
                return
            status = job.status
            step = max((e.get("step", 0) for e in job.events if e["event"] == "step"), default=0)
            now = time.monotonic()
            values: dict = {}
            if status in FINAL:
                self._closed = True
                if status == "cancelled" and job.http_status == 503:  # the server stopped: run it again next time
                    job.unsubscribe(self)
                    return
                values = {
                    "status": status,
                    "step": step,
                    "error": job.error,
                    "http_status": job.http_status,
                    "png": job.png if status == "done" else None,
                }
            elif status != self._status:
                values = {"status": status, "step": step}
            elif step != self._step and now - self._written >= self.STEP_EVERY_S:
                values = {"step": step}
            if not values:
                return
            for name in ("replica", "lora_set"):
                if getattr(job, name, None):
                    values[name] = getattr(job, name)
            self._status, self._step, self._written = status, step, now
        if self._closed:
            job.unsubscribe(self)
        try:
            self.store.update(self.id, **values)
        except JobStoreError as exc:  # the job is still answered from memory; it will not survive a restart
            log.warning("job %s: not saved: %s", self.id, exc)
