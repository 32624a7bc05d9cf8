"""The catalog: one SQLite file (standard library) describing every LoRA file of a library folder.

Default location: ``LIBRARY/.lora-composer/catalog.sqlite`` (a hidden folder, so the library listing never
sees it). Delete it to rebuild from scratch; ``compose index DIR`` brings it up to date incrementally:

- a file whose size and mtime match its row is skipped unread; when they differ its sha256 is compared
  and only a file whose content changed is loaded again (its sidecars and preview are re-read when their
  mtimes change);
- files that cannot be read are listed with the reason (table ``skipped``) and indexing goes on;
- rows of files that disappeared are removed;
- when the loader learns new formats (:data:`LOADER`), files skipped before are tried again, and rows
  written before a column existed are read again.

Tables: ``files`` (path, sha256, A1111 short hash, size, mtime, name, base family, method (``kinds``: LoRA,
LoCon, LoHa, LoKr, DoRA...), rank, targeted layers,
trigger words, tags from ``ss_tag_frequency``, description, preferred weight, preview image, the weight
signal's directions), ``fts`` (FTS5 over name, trigger words, tags, description), ``embeddings`` (text
embeddings per text encoder, learned weight embeddings per model), ``encoders`` (each text encoder's
per-position centre), ``skipped``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_composer.adapters.metadata import sidecar_paths, tags_from_frequency
from lora_composer.library import list_loras, lora_name

CATALOG_DIR = ".lora-composer"
CATALOG_NAME = "catalog.sqlite"
SCHEMA_VERSION = 1
PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg", ".jpeg", ".webp")
MAX_TAGS = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    sha256 TEXT NOT NULL,
    short_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    side_mtime_ns INTEGER NOT NULL DEFAULT 0,
    name TEXT NOT NULL,
    family TEXT NOT NULL,
    kinds TEXT NOT NULL DEFAULT '',
    rank INTEGER,
    targets TEXT NOT NULL DEFAULT '[]',
    trigger_words TEXT NOT NULL DEFAULT '[]',
    tags TEXT NOT NULL DEFAULT '[]',
    description TEXT NOT NULL DEFAULT '',
    preferred_weight REAL,
    preview TEXT,
    weight_dirs BLOB,
    weight_dim INTEGER,
    weight_energy REAL,
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_family ON files(family);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(name, trigger_words, tags, description, tokenize='unicode61');
CREATE TABLE IF NOT EXISTS embeddings (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    signal TEXT NOT NULL,
    encoder TEXT NOT NULL,
    vec BLOB,
    PRIMARY KEY (file_id, signal, encoder)
);
CREATE TABLE IF NOT EXISTS encoders (id TEXT PRIMARY KEY, mean BLOB NOT NULL, shape TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT NOT NULL);
"""


def _loader_signature() -> str:
    """What the adapter loader reads and refuses: a skip remembered under another signature may not hold."""
    from lora_composer.adapters.kinds import KINDS
    from lora_composer.adapters.lycoris import NOT_LOADED

    return f"{','.join(KINDS)};boft;refused:{','.join(f for f, _ in NOT_LOADED)}"


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0

    @property
    def indexed(self) -> int:
        return len(self.added) + len(self.updated)


def default_catalog_path(library) -> Path:
    """``LIBRARY/.lora-composer/catalog.sqlite``; for a library folder we may not write to (a read-only
    share, the default model's library inside an installed package), a catalog in the user cache instead."""
    from lora_composer.cache import cache_dir, inside_package

    library = Path(library).expanduser()
    inside = library / CATALOG_DIR
    writable = os.access(inside if inside.exists() else library, os.W_OK) or not library.exists()
    if writable and not inside_package(library):
        return inside / CATALOG_NAME

    key = hashlib.sha256(str(library.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "catalogs" / key / CATALOG_NAME


def _strip_html(text: str) -> str:
    text = re.sub(r"<[^>]+>", " ", text or "")
    for a, b in (("&nbsp;", " "), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#39;", "'")):
        text = text.replace(a, b)
    return re.sub(r"\s+", " ", text).strip()


def find_preview(path: Path) -> Path | None:
    base = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        p = base.with_name(base.name + suffix)
        if p.is_file():
            return p
    return None


def _side_mtime(path: Path) -> int:
    extra = list(sidecar_paths(path))
    preview = find_preview(path)
    if preview is not None:
        extra.append(preview)
    return max((p.stat().st_mtime_ns for p in extra), default=0) + len(extra)


def _blob(a: np.ndarray | None) -> bytes | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32).tobytes()


def _unblob(b: bytes | None, shape=None) -> np.ndarray | None:
    if b is None:
        return None
    a = np.frombuffer(b, dtype=np.float32)
    return a.reshape(shape) if shape is not None else a


@dataclass
class Row:
    id: int
    path: str
    sha256: str
    short_hash: str
    name: str
    family: str
    rank: int | None
    targets: list[str]
    trigger_words: list[str]
    tags: list[str]
    description: str
    preferred_weight: float | None
    preview: str | None
    weight_dirs: np.ndarray | None  # [m, d]
    kinds: str = ""  # the method, as a user names it (``LoCon``, ``LoHa + DoRA``); "" until indexed again

    @property
    def text(self) -> str:
        """What the text signal embeds: trigger words, then the description."""
        parts = [", ".join(self.trigger_words)] if self.trigger_words else []
        if self.description:
            parts.append(self.description)
        return ". ".join(parts)


class Catalog:
    """A catalog file. ``Catalog.for_library(DIR)`` opens (creating if needed) the default one."""

    def __init__(self, path, root=None):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(root).expanduser() if root is not None else None
        self.db = sqlite3.connect(str(self.path))
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(_SCHEMA)
        try:  # rows indexed since a stamp (a vector index's incremental update) without reading every row
            self.db.execute("CREATE INDEX IF NOT EXISTS files_family_stamp ON files(family, indexed_at)")
        except sqlite3.OperationalError:  # a read-only catalog: the update reads every row's stamp instead
            pass
        version = self.get_meta("schema")
        if version is None:
            self.set_meta("schema", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path}: catalog schema {version}, expected {SCHEMA_VERSION}; delete it to rebuild"
            )
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(files)")}
        if "kinds" not in columns:  # a catalog from before the column: its rows are read again on the next index
            self.db.execute("ALTER TABLE files ADD COLUMN kinds TEXT NOT NULL DEFAULT ''")
            self.db.execute("UPDATE files SET sha256 = '', mtime_ns = 0")
        loader = _loader_signature()
        if self.get_meta("loader") != loader:
            self.db.execute("DELETE FROM skipped")
            self.set_meta("loader", loader)
        if self.get_meta("uid") is None:  # this catalog file's identity (a vector index belongs to one)
            import uuid

            self.set_meta("uid", uuid.uuid4().hex)
        if self.root is not None:
            self.set_meta("root", str(self.root.resolve()))
        self.db.commit()

    @classmethod
    def for_library(cls, library, path=None) -> "Catalog":
        return cls(path or default_catalog_path(library), root=library)

    def reader(self) -> "Catalog":
        """This catalog on a second, read-only connection that any thread may use (the retriever's FTS5
        query runs beside the vector search)."""
        import copy

        other = copy.copy(self)
        other.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        return other

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- meta ----------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def version(self) -> str:
        """Changes whenever rows or embeddings change (for in-memory caches)."""
        return self.get_meta("version") or "0"

    def _bump(self) -> None:
        self.set_meta("version", f"{time.time_ns()}")

    # -- indexing ------------------------------------------------------------------------------------
    def index(self, folder=None, progress: bool = True, allow_pickle: bool = False, encoder=None) -> IndexReport:
        """Bring the catalog up to date with ``folder`` (default: the library). See the module doc."""
        from lora_composer.adapters import load_adapter
        from lora_composer.adapters.io import sha256_file
        from lora_composer.adapters.kinds import kind_label
        from tqdm import tqdm

        from lora_composer.retriever.signals import weights as wsig

        started = time.perf_counter()
        root = Path(folder or self.root).expanduser()
        report = IndexReport()
        files = list_loras(root)
        known = {
            r[0]: r[1:] for r in self.db.execute("SELECT path, id, size, mtime_ns, sha256, side_mtime_ns FROM files")
        }
        skipped_before = {r[0]: r[1:] for r in self.db.execute("SELECT path, size, mtime_ns, reason FROM skipped")}
        seen = set()
        bar = tqdm(files, desc="indexing", unit="file", disable=not progress, file=sys.stderr, leave=False)
        for p in bar:
            path = str(p.resolve())
            seen.add(path)
            try:
                st = p.stat()
                side = _side_mtime(p)
            except OSError as e:
                report.skipped.append((path, str(e)))
                continue
            row = known.get(path)
            if row is not None and row[1] == st.st_size and row[2] == st.st_mtime_ns and row[4] == side:
                report.unchanged += 1
                continue
            before = skipped_before.get(path)
            if row is None and before is not None and before[0] == st.st_size and before[1] == st.st_mtime_ns:
                report.skipped.append((path, before[2]))
                continue
            try:
                if row is not None and row[1] == st.st_size and row[4] == side:
                    if sha256_file(p) == row[3]:  # touched, same content
                        self.db.execute("UPDATE files SET mtime_ns = ? WHERE id = ?", (st.st_mtime_ns, row[0]))
                        report.unchanged += 1
                        continue
                adapter = load_adapter(p, allow_pickle=allow_pickle)
                header = adapter.metadata.file_metadata or {}
                tags = tags_from_frequency(header.get("ss_tag_frequency"), top=MAX_TAGS)
                encoded = wsig.encode_adapter(adapter)
                dirs, energy = encoded if encoded is not None else (None, None)
                ranks = sorted(adapter.ranks)
                preview = find_preview(p)
                values = dict(
                    path=path,
                    sha256=adapter.metadata.sha256,
                    short_hash=adapter.metadata.short_hash,
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    side_mtime_ns=side,
                    name=lora_name(p),
                    family=adapter.family,
                    kinds=kind_label(adapter),
                    rank=ranks[-1] if ranks else None,
                    targets=json.dumps(sorted(adapter.deltas)),
                    trigger_words=json.dumps(adapter.metadata.trigger_words),
                    tags=json.dumps(tags),
                    description=_strip_html(adapter.metadata.description),
                    preferred_weight=adapter.metadata.preferred_weight,
                    preview=str(preview) if preview else None,
                    weight_dirs=_blob(dirs),
                    weight_dim=None if dirs is None else int(dirs.shape[1]),
                    weight_energy=energy,
                    indexed_at=time.time(),
                )
            except Exception as e:  # noqa: BLE001 - one bad file never stops indexing
                reason = re.sub(r"\s+", " ", str(e)).strip()
                if reason.startswith(str(p)):
                    reason = reason[len(str(p)) :].lstrip(": ")
                report.skipped.append((path, reason or type(e).__name__))
                self.db.execute(
                    "INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?)", (path, st.st_size, st.st_mtime_ns, reason)
                )
                if row is not None:
                    self._delete(row[0])
                continue
            cols = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            if row is not None:
                self._delete(row[0])
                report.updated.append(path)
            else:
                report.added.append(path)
            cur = self.db.execute(f"INSERT INTO files ({cols}) VALUES ({marks})", tuple(values.values()))
            self.db.execute(
                "INSERT INTO fts (rowid, name, trigger_words, tags, description) VALUES (?, ?, ?, ?, ?)",
                (
                    cur.lastrowid,
                    _words_of_name(values["name"]),
                    ", ".join(json.loads(values["trigger_words"])),
                    ", ".join(tags),
                    values["description"],
                ),
            )
            self.db.execute("DELETE FROM skipped WHERE path = ?", (path,))
            if report.indexed % 50 == 0:
                self.db.commit()
        bar.close()
        under = str(root.resolve())
        for path, row in known.items():
            if path not in seen and (path == under or path.startswith(under + os.sep)):
                self._delete(row[0])
                report.removed.append(path)
        for path in skipped_before:
            if path not in seen and path.startswith(under + os.sep):
                self.db.execute("DELETE FROM skipped WHERE path = ?", (path,))
        if report.indexed or report.removed:
            self._bump()
        self.db.commit()
        if encoder is not None:
            self.ensure_text_embeddings(encoder)
        report.seconds = time.perf_counter() - started
        return report

    def _delete(self, file_id: int) -> None:
        self.db.execute("DELETE FROM fts WHERE rowid = ?", (file_id,))
        self.db.execute("DELETE FROM embeddings WHERE file_id = ?", (file_id,))
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    # -- reading -------------------------------------------------------------------------------------
    _ROW_COLS = (
        "id, path, sha256, short_hash, name, family, rank, targets, trigger_words, tags, description, "
        "preferred_weight, preview, weight_dirs, weight_dim, kinds"
    )

    def _row(self, r) -> Row:
        dirs = None
        if r[13] is not None and r[14]:
            dirs = _unblob(r[13]).reshape(-1, int(r[14]))
        return Row(
            id=r[0],
            path=r[1],
            sha256=r[2],
            short_hash=r[3],
            name=r[4],
            family=r[5],
            rank=r[6],
            targets=json.loads(r[7]),
            trigger_words=json.loads(r[8]),
            tags=json.loads(r[9]),
            description=r[10],
            preferred_weight=r[11],
            preview=r[12],
            weight_dirs=dirs,
            kinds=r[15],
        )

    def rows(self, family: str | None = None) -> list[Row]:
        sql = f"SELECT {self._ROW_COLS} FROM files"
        args: tuple = ()
        if family is not None:
            sql += " WHERE family = ?"
            args = (family,)
        return [self._row(r) for r in self.db.execute(sql + " ORDER BY id", args)]

    def family_count(self, family: str | None = None, min_id: int = 0) -> int:
        """How many rows of ``family`` (with an id of at least ``min_id``)."""
        sql = "SELECT COUNT(*) FROM files WHERE id >= ?" + (" AND family = ?" if family else "")
        return int(self.db.execute(sql, (min_id, family) if family else (min_id,)).fetchone()[0])

    def family_ids(self, family: str | None = None, since: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(file ids, indexed_at stamps)`` of a family's rows (indexed after ``since``), by id: what a vector
        index must hold."""
        where = [w for w in ("family = ?" if family else None, "indexed_at > ?" if since is not None else None) if w]
        args = tuple(a for a in (family, since) if a is not None)
        sql = "SELECT id, indexed_at FROM files" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        got = self.db.execute(sql, args).fetchall()
        if not got:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        a = np.asarray(got, dtype=np.float64)
        return a[:, 0].astype(np.int64), a[:, 1]

    def rows_by_ids(self, ids) -> dict[int, Row]:
        """``{id: Row}`` for the given ids (one query per 900 ids)."""
        ids = [int(i) for i in ids]
        out = {}
        for a in range(0, len(ids), 900):
            part = ids[a : a + 900]
            sql = f"SELECT {self._ROW_COLS} FROM files WHERE id IN ({','.join('?' * len(part))})"
            for r in self.db.execute(sql, part):
                out[r[0]] = self._row(r)
        return out

    def words_by_ids(self, ids) -> list[tuple]:
        """``(id, name, trigger words JSON, tags JSON, description)`` of the given ids (one query per 900 ids):
        what the lexical signal scores, without the rest of the row."""
        ids = [int(i) for i in ids]
        out = []
        for a in range(0, len(ids), 900):
            part = ids[a : a + 900]
            sql = f"SELECT id, name, trigger_words, tags, description FROM files WHERE id IN ({','.join('?' * len(part))})"
            out += self.db.execute(sql, part).fetchall()
        return out

    def word_rows(self, family: str | None = None, min_id: int = 0):
        """Light rows (id, name, trigger words, description) of a family, in id order: what the selection
        vocabulary reads, without the weight blobs."""
        from types import SimpleNamespace

        sql = "SELECT id, name, trigger_words, description FROM files WHERE id >= ?" + (
            " AND family = ?" if family else ""
        )
        for r in self.db.execute(sql + " ORDER BY id", (min_id, family) if family else (min_id,)):
            yield SimpleNamespace(id=r[0], name=r[1], trigger_words=json.loads(r[2]), description=r[3])

    def vectors_of(self, signal: str, encoder_id: str, ids) -> dict[int, np.ndarray | None]:
        """Embeddings of ``signal`` for the given file ids (absent ids: no entry)."""
        ids = [int(i) for i in ids]
        out = {}
        for a in range(0, len(ids), 900):
            part = ids[a : a + 900]
            sql = (
                f"SELECT file_id, vec FROM embeddings WHERE signal = ? AND encoder = ? AND file_id IN "
                f"({','.join('?' * len(part))})"
            )
            out.update((int(i), _unblob(v)) for i, v in self.db.execute(sql, (signal, encoder_id, *part)))
        return out

    def weight_dirs_of(self, ids) -> dict[int, np.ndarray]:
        """The weight signal's directions ``[m, d]`` of the given file ids (rows without any: no entry)."""
        ids = [int(i) for i in ids]
        out = {}
        for a in range(0, len(ids), 900):
            part = ids[a : a + 900]
            sql = (
                f"SELECT id, weight_dirs, weight_dim FROM files WHERE weight_dirs IS NOT NULL AND id IN "
                f"({','.join('?' * len(part))})"
            )
            out.update((int(i), _unblob(b).reshape(-1, int(w))) for i, b, w in self.db.execute(sql, part) if w)
        return out

    def missing(self, signal: str, encoder_id: str, family: str | None = None) -> list[Row]:
        """Rows of ``family`` with no ``signal`` embedding for ``encoder_id`` yet (found in SQL, not by reading
        every row)."""
        sql = (
            f"SELECT {', '.join('f.' + c.strip() for c in self._ROW_COLS.split(','))} FROM files f LEFT JOIN "
            "embeddings e ON e.file_id = f.id AND e.signal = ? AND e.encoder = ? WHERE e.file_id IS NULL"
            + (" AND f.family = ?" if family else "")
            + " ORDER BY f.id"
        )
        args = (signal, encoder_id, family) if family else (signal, encoder_id)
        return [self._row(r) for r in self.db.execute(sql, args)]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    def skipped(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, reason FROM skipped ORDER BY path"))

    def fts_search(self, words: list[str], family: str | None = None, limit: int = 500) -> list[tuple]:
        """``[(file id, bm25)]`` best first (bm25 here is positive: larger is better)."""
        words = [w for w in words if w]
        if not words:
            return []
        query = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        if family is not None and self._families() == [family]:  # one family: no join (a third of the time at 1M)
            family = None
        sql = (
            "SELECT fts.rowid, -bm25(fts, 2.0, 4.0, 1.0, 0.5) AS s FROM fts "
            + (
                "JOIN files ON files.id = fts.rowid WHERE fts MATCH ? AND files.family = ?"
                if family
                else "WHERE fts MATCH ?"
            )
            + " ORDER BY s DESC LIMIT ?"
        )
        args = (query, family, limit) if family else (query, limit)
        return [(int(i), float(s)) for i, s in self.db.execute(sql, args)]

    def fts_common(self, words: list[str], more_than: int) -> set[str]:
        """The ``words`` that more than ``more_than`` rows contain (any FTS5 column), each counted with a
        bounded match (``LIMIT more_than + 1``: rowid order, no ranking, so the cost is at most ``more_than``
        rows per word whatever the word's frequency; an ``fts5vocab`` count reads the word's whole doclist,
        70 ms for a word of every row at 1M rows), remembered per catalog version."""
        version = self.version()
        memo = getattr(self, "_fts_counts", None)
        if memo is None or memo[0] != (version, more_than):
            memo = self._fts_counts = ((version, more_than), {})
        seen = memo[1]
        if len(seen) > 100_000:  # bounded: a long-running server sees many prompts' words
            seen.clear()
        sql = "SELECT count(*) FROM (SELECT rowid FROM fts WHERE fts MATCH ? LIMIT ?)"
        for w in words:
            if w and w not in seen:
                seen[w] = self.db.execute(sql, ('"' + w.replace('"', '""') + '"', more_than + 1)).fetchone()[0]
        return {w for w in words if w and seen[w] > more_than}

    def _families(self) -> list[str]:
        """The catalog's base families (cached per catalog version)."""
        version = self.version()
        if getattr(self, "_families_at", (None,))[0] != version:
            self._families_at = (version, [r[0] for r in self.db.execute("SELECT DISTINCT family FROM files")])
        return self._families_at[1]

    # -- embeddings ----------------------------------------------------------------------------------
    def encoder_mean(self, encoder) -> None:
        """Give ``encoder`` its per-position centre from the catalog, or compute and store it."""
        r = self.db.execute("SELECT mean, shape FROM encoders WHERE id = ?", (encoder.id,)).fetchone()
        import torch

        if r is not None:
            encoder.set_mean(torch.from_numpy(_unblob(r[0], json.loads(r[1])).copy()))
            return
        mean = encoder.mean.numpy()
        self.db.execute(
            "INSERT OR REPLACE INTO encoders VALUES (?, ?, ?)", (encoder.id, _blob(mean), json.dumps(list(mean.shape)))
        )
        self.db.commit()

    def embeddings(self, signal: str, encoder_id: str) -> dict[int, np.ndarray | None]:
        return {
            int(i): _unblob(v)
            for i, v in self.db.execute(
                "SELECT file_id, vec FROM embeddings WHERE signal = ? AND encoder = ?", (signal, encoder_id)
            )
        }

    def put_embeddings(self, signal: str, encoder_id: str, items: dict[int, np.ndarray | None]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)",
            [(i, signal, encoder_id, _blob(v)) for i, v in items.items()],
        )
        self._bump()
        self.db.commit()

    def ensure_text_embeddings(self, encoder, family: str | None = None, progress: bool = False) -> int:
        """Embed the text of every row of ``encoder``'s family that has none for this encoder yet."""
        self.encoder_mean(encoder)
        fam = family or encoder.family
        todo = self.missing("text", encoder.id, fam)
        if not todo:
            return 0
        out: dict[int, np.ndarray | None] = {}
        texts = [r.text for r in todo]
        described = [i for i, t in enumerate(texts) if t.strip()]
        for i, r in enumerate(todo):
            out[r.id] = None
        for start in range(0, len(described), 64):
            idx = described[start : start + 64]
            for i, enc in zip(idx, encoder.encode([texts[i] for i in idx])):
                v = enc.vector
                out[todo[i].id] = None if v is None else v.numpy()
        self.put_embeddings("text", encoder.id, out)
        return len(todo)


def _words_of_name(name: str) -> str:
    """``pixel-art_v2`` -> ``pixel-art_v2 pixel art v2`` so FTS finds the parts."""
    parts = [w for w in re.split(r"[^0-9A-Za-z]+", name) if w]
    return " ".join([name, *parts])
