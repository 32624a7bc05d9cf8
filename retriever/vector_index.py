"""Stage 1 for catalogs above :data:`EXACT_ROWS`: a FAISS inverted-file index beside the SQLite catalog.

Why an index: the fused dense score of a row is ``sum_b w_b <q_b, x_b>`` over its column blocks (text, weight
directions, learned, preview) once each calibrated signal is read as its linear part, so it is **one inner
product** of the row's concatenated blocks with a query whose blocks carry the signal weights. Any inner-product
index can then propose candidates, which :class:`~lora_composer.retriever.search.Retriever` rescores exactly
(float32, every signal and the noisy-OR). A brute-force scan costs ``rows x width`` per query (1M x 2304
float32: 9 GB read per query); the index reads a few lists of 4-bit codes.

Why FAISS (``faiss-cpu``), ``IVF{nlist},PQ{M}x4fs``: measured on this project's 2-core machine
(``python -m bench.retrieval --parts libraries``, 20K rows x 2304, one thread; docs/BENCHMARKS.md), it builds
about 5x faster than usearch's HNSW (int8) and answers a query about 14x faster (0.16 ms against 2.3 ms). A
``--loras auto`` query sends one index query per prompt token, weight direction and sign (65 for 8 tokens), so
the cost per query decides; the recall that matters is the retriever's top 20 after the exact rescore of the
union, measured against the exact scan at 100K and 1M rows. An IVF build is one k-means on a sample plus one
assignment per row (minutes at 1M on two cores; HNSW's graph build grows faster). IVF-PQ also supports
``add_with_ids`` (incremental updates) and ``read_index`` / ``write_index`` (persistence).

Files (one folder per family and embedding space, ``<catalog dir>/vectors/<key>/``):

- ``index.faiss``: the IVF-PQ index of the rows present at the last build or compaction, ids = slots;
- ``seg-<k>.faiss``: the rows added since, in a few small indexes of the same trained quantizer and codebooks
  (``trained.faiss``: that index with no rows), searched beside ``index.faiss`` and their results merged;
- ``vectors.f32``: every slot's exact float32 row, append-only, read with ``pread`` (only the candidates);
- ``ids.i64``, ``stamps.f64``, ``present.u8``: per slot the catalog file id (-1 once removed), its
  ``indexed_at`` stamp, the per-block ``present`` flags; raw arrays, appended to;
- ``meta.json``: width, blocks, catalog uid, slot count, the rows in ``index.faiss``, the segment files.

Updates are incremental and write in proportion to the rows they touch: new or changed rows are appended (to
the four per-slot files and as a new segment file: ``index.faiss``, 160 MB at 1M rows, is not rewritten), and
removed ones marked dead in place (a tombstone: searches skip them; FAISS's ``remove_ids`` on fast-scan lists
damaged the codes of rows added after it, ``tests/test_retriever_index.py``). More than
:data:`MAX_SEGMENTS` segments are merged into one (work: the rows added since the build); once they hold more
than :data:`COMPACT_SHARE` of the rows in ``index.faiss`` they are folded into it (one rewrite, amortised over
that many added rows). :meth:`VectorIndex.build` (``compose index --rebuild``) starts over, which also
reclaims dead slots.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

EXACT_ROWS = 20_000  # up to this many rows of a family, stage 1 is the exact in-memory scan
SUBVECTOR = 8  # dims per PQ sub-quantizer (4-bit codes: 4 bits per 8 dims)
NPROBE = 8  # lists searched per query (16 and 24 before: the same top-20 recall at 100K and 1M rows, bench.retrieval)
CHUNK = 10_000  # rows fetched, encoded and added at a time (bounded memory for 1M-row builds)
ROW_CACHE = 32_768  # rows gather keeps in memory (302 MB at SD1.5's width of 2,304 float32)
MAX_SEGMENTS = 4  # segment files of added rows before they are merged into one
COMPACT_SHARE = 0.25  # segments holding this share of index.faiss's rows are folded into it
FORMAT = 2
SLOT_FILES = {"ids": ("ids.i64", np.int64), "stamps": ("stamps.f64", np.float64), "present": ("present.u8", np.uint8)}


def nlist_for(n: int) -> int:
    """Inverted lists: about ``sqrt(n)`` rounded to a power of two, 64..1024 (1024 at 1M: lists of ~1,000
    rows, a k-means that trains in a minute on two cores), fewer for a small catalog."""
    want = min(1024, max(64, 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))))
    return int(max(1, min(want, 2 ** int(math.log2(max(n // 39, 1))))))  # at least 39 training rows a list


def padded(width: int) -> int:
    step = 2 * SUBVECTOR  # fast-scan PQ wants an even number of sub-quantizers
    return -(-width // step) * step


class VectorIndex:
    """The on-disk index of one catalog family in one embedding space (see the module doc)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta: dict = {}
        self.ids = np.zeros(0, np.int64)
        self.stamps = np.zeros(0, np.float64)
        self.present = np.zeros((0, 0), bool)
        self.index = None  # index.faiss
        self.segments: list = []  # the seg-<k>.faiss indexes
        self.vectors = None
        self._fd = None
        self._cache = None  # gather's row cache: (slot per entry, rows)

    # -- files -----------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.folder / "meta.json").is_file() and (self.folder / "index.faiss").is_file()

    @property
    def ntotal(self) -> int:
        """Rows in FAISS (index.faiss and the segments), dead slots included."""
        return int(self.index.ntotal) + sum(int(g.ntotal) for g in self.segments) if self.index is not None else 0

    def _read(self, name, how):
        try:
            return how(self.folder / name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"{self.folder / name}: unreadable ({why}); compose index --rebuild rebuilds it") from e

    def _faiss(self, name: str, mmap: bool = True):
        import faiss

        return self._read(name, lambda p: faiss.read_index(str(p), faiss.IO_FLAG_MMAP if mmap else 0))

    def open(self, mmap: bool = True) -> "VectorIndex":
        """Read the index and its segments (memory-mapped where FAISS can), the per-slot arrays, and open
        the vectors for reading."""
        self.meta = self._read("meta.json", lambda p: json.loads(p.read_text()))
        if self.meta.get("format") != FORMAT:
            raise ValueError(
                f"{self.folder / 'meta.json'}: format {self.meta.get('format')} of an older version, "
                f"this one reads {FORMAT}; it is rebuilt"
            )
        n = int(self.meta["slots"])
        nb = len(self.meta["blocks"])
        got = {}
        for key, (name, dtype) in SLOT_FILES.items():
            count = n * (nb if key == "present" else 1)
            arr = self._read(name, lambda p, dt=dtype, c=count: np.fromfile(p, dt, c))
            if len(arr) != count:
                raise ValueError(f"{self.folder / name}: {len(arr)} entries, meta.json's {n} slots need {count}")
            got[key] = arr
        self.ids, self.stamps = got["ids"], got["stamps"]
        self._cache = None
        self.present = got["present"].reshape(n, nb).astype(bool)
        self.index = self._faiss("index.faiss", mmap)
        self.segments = [self._faiss(name, mmap) for name in self.meta["segments"]]
        if self.ntotal != n:
            raise ValueError(f"{self.folder / 'index.faiss'}: {self.ntotal} rows with its segments, meta.json says {n}")
        self._map()
        return self

    def _map(self) -> None:
        n, width = int(self.meta["slots"]), int(self.meta["width"])
        f = self.folder / "vectors.f32"
        if f.stat().st_size < n * width * 4:
            raise ValueError(f"{f}: {f.stat().st_size} bytes, {n} slots x {width} float32 need {n * width * 4}")
        self.vectors = np.memmap(f, np.float32, "r", shape=(n, width)) if n else np.zeros((0, width), np.float32)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(f, os.O_RDONLY)

    def _write_meta(self) -> None:
        self.meta["slots"] = int(len(self.ids))
        (self.folder / "meta.tmp.json").write_text(json.dumps(self.meta))
        os.replace(self.folder / "meta.tmp.json", self.folder / "meta.json")

    def _write_faiss(self, index, name: str) -> None:
        import faiss

        tmp = self.folder / (name + ".tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, self.folder / name)

    # -- building and updating -------------------------------------------------------------------
    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def live(self) -> np.ndarray:
        """``ids >= 0`` (kept while ``ids`` is the same array: every query reads it)."""
        got = getattr(self, "_live", None)
        if got is None or got[0] is not self.ids:
            mask = self.ids >= 0
            got = self._live = (self.ids, mask, int(mask.sum()))
        return got[1]

    @property
    def dead(self) -> int:
        self.live
        return len(self.ids) - self._live[2]

    def build(self, ids, stamps, fetch, width: int, blocks: dict, uid: str, threads: int | None = None) -> None:
        """Start over with rows ``ids`` (``fetch(ids) -> (float32 [n, width], bool present [n, blocks])``)."""
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        ids = np.asarray(ids, np.int64)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        n = len(ids)
        self.meta = {
            "width": int(width),
            "blocks": {k: list(v) for k, v in blocks.items()},
            "uid": uid,
            "slots": 0,
            "nlist": nlist_for(n),
            "format": FORMAT,
            "main_rows": 0,
            "segments": [],
            "next_segment": 0,
        }
        for name in ["vectors.f32", *(f for f, _ in SLOT_FILES.values())]:
            (self.folder / name).write_bytes(b"")
        self.ids = np.zeros(0, np.int64)
        self.stamps = np.zeros(0, np.float64)
        self.present = np.zeros((0, len(blocks)), bool)
        self._cache = None  # slots are numbered again
        dp = padded(width)
        index = faiss.index_factory(dp, f"IVF{self.meta['nlist']},PQ{dp // SUBVECTOR}x4fs", faiss.METRIC_INNER_PRODUCT)
        # train on a spread sample (every step-th row: the catalog's order mixes its clusters)
        want = min(n, max(40 * self.meta["nlist"], 10_000))
        pick = np.linspace(0, n - 1, want).astype(np.int64) if n else np.zeros(0, np.int64)
        sample = np.concatenate([fetch(ids[pick[i : i + CHUNK]])[0] for i in range(0, len(pick), CHUNK)]) if n else None
        if n:
            sample = self._pad(sample)
            if len(sample) < 256:  # PQ's 16 centroids per sub-vector need rows: a tiny catalog (tests) jitters copies
                rng = np.random.default_rng(0)
                reps = np.repeat(sample, -(-256 // len(sample)), axis=0)
                sample = reps + 1e-3 * rng.standard_normal(reps.shape).astype(np.float32)
            index.train(sample)
        del sample
        self._write_faiss(index, "trained.faiss")  # the empty trained index: what each segment starts from
        self.index, self.segments = index, []
        self._append(ids, np.asarray(stamps, np.float64), fetch, index)
        self._write_faiss(index, "index.faiss")
        self.meta["main_rows"] = len(self.ids)
        self._write_meta()
        self._map()

    def update(self, ids, stamps, fetch) -> tuple[int, int]:
        """Bring the index to exactly the live rows ``ids`` (with ``stamps``): rows whose id or stamp is new are
        appended, rows no longer there (or re-stamped) marked dead. Returns ``(added, removed)``. Work and
        writes: the changed rows."""
        ids = np.asarray(ids, np.int64)
        stamps = np.asarray(stamps, np.float64)
        live = np.flatnonzero(self.live)
        have = dict(zip(self.ids[live].tolist(), zip(live.tolist(), self.stamps[live].tolist())))
        want = dict(zip(ids.tolist(), stamps.tolist()))
        gone = [slot for fid, (slot, st) in have.items() if want.get(fid) != st]
        new = [
            i for i, (fid, st) in enumerate(zip(ids.tolist(), stamps.tolist())) if have.get(fid, (None, None))[1] != st
        ]
        if not gone and not new:
            return 0, 0
        if gone:  # tombstones: FAISS's remove_ids on fast-scan lists corrupted codes of rows added after it
            self.ids = self.ids.copy()  # a new array: the cached live mask is recomputed
            dead = np.asarray(sorted(gone), np.int64)
            self.ids[dead] = -1
            fd = os.open(self.folder / "ids.i64", os.O_WRONLY)
            try:
                for slot in dead.tolist():
                    os.pwrite(fd, np.int64(-1).tobytes(), slot * 8)
            finally:
                os.close(fd)
        if new:
            sel = np.asarray(new, np.int64)
            self._add_segment(ids[sel], stamps[sel], fetch)
        self._write_meta()
        self._map()
        return len(new), len(gone)

    def sync(self, catalog, family: str | None, fetch) -> tuple[int, int]:
        """:meth:`update` from the catalog, reading only the rows indexed after the newest one held when that
        is all that changed (rows added: the common case, work proportional to them); any removal or change
        of a held row makes the counts disagree, and then every id and stamp is compared."""
        live = int(self.live.sum())
        newest = float(self.stamps[self.live].max()) if live else float("-inf")
        ids, stamps = catalog.family_ids(family, since=newest if live else None)
        if not live or live + len(ids) != catalog.family_count(family) or (len(ids) and ids.min() <= self.ids.max()):
            ids, stamps = catalog.family_ids(family)
            return self.update(ids, stamps, fetch)
        if not len(ids):
            return 0, 0
        self._add_segment(ids, stamps, fetch)
        self._write_meta()
        self._map()
        return len(ids), 0

    def _add_segment(self, ids: np.ndarray, stamps: np.ndarray, fetch) -> None:
        """Append rows as a new segment file; merge the segments when there are too many, fold them into
        index.faiss when they hold a large share of its rows."""
        seg = self._empty()
        self._append(ids, stamps, fetch, seg)
        self._new_segment(seg)
        main = int(self.meta["main_rows"])
        added = len(self.ids) - main
        if main and added > COMPACT_SHARE * main:  # fold: one rewrite of index.faiss per COMPACT_SHARE x its rows
            index = self._faiss("index.faiss", mmap=False)
            self._readd(index, main, len(self.ids))
            self._write_faiss(index, "index.faiss")
            self.index, self.meta["main_rows"] = index, len(self.ids)
            self._drop_segments()
        elif len(self.segments) > MAX_SEGMENTS:  # merge the segments (work: the rows added since the build)
            seg = self._empty()
            self._readd(seg, main, len(self.ids))
            self._drop_segments()
            self._new_segment(seg)

    def _empty(self):
        return self._faiss("trained.faiss", mmap=False)

    def _new_segment(self, seg) -> None:
        k = int(self.meta["next_segment"])
        name = f"seg-{k}.faiss"
        self._write_faiss(seg, name)
        self.meta["next_segment"] = k + 1
        self.meta["segments"] = [*self.meta["segments"], name]
        self.segments = [*self.segments, seg]

    def _drop_segments(self) -> None:
        old = list(self.meta["segments"])
        self.meta["segments"], self.segments = [], []
        self._write_meta()  # the files go only once meta.json no longer names them
        for name in old:
            (self.folder / name).unlink(missing_ok=True)

    def _readd(self, index, a: int, b: int) -> None:
        """Add slots ``a .. b - 1`` (from vectors.f32, dead ones too: ntotal stays the slot count) to ``index``."""
        width = self.width
        with open(self.folder / "vectors.f32", "rb") as fh:
            for s in range(a, b, CHUNK):
                e = min(b, s + CHUNK)
                fh.seek(s * width * 4)
                vecs = np.fromfile(fh, np.float32, (e - s) * width).reshape(e - s, width)
                index.add_with_ids(self._pad(vecs), np.arange(s, e, dtype=np.int64))

    def _append(self, ids: np.ndarray, stamps: np.ndarray, fetch, index) -> None:
        """Write the rows' vectors at the end of ``vectors.f32`` (plain writes: a mapping would keep every
        written page in this process's resident memory) and of the per-slot files, and add them to ``index``,
        a chunk at a time."""
        width = self.width
        start = len(self.ids)
        f = self.folder / "vectors.f32"
        present = []
        with open(f, "r+b") as fh:
            fh.truncate(start * width * 4)  # drop a tail an interrupted update may have left
            fh.seek(start * width * 4)
            for a in range(0, len(ids), CHUNK):
                vecs, pres = fetch(ids[a : a + CHUNK])
                vecs = np.ascontiguousarray(vecs, np.float32)
                if vecs.shape != (min(CHUNK, len(ids) - a), width):
                    raise ValueError(
                        f"{f}: vectors of shape {vecs.shape}, expected ({min(CHUNK, len(ids) - a)}, {width})"
                    )
                fh.write(vecs.tobytes())
                index.add_with_ids(self._pad(vecs), np.arange(start + a, start + a + len(vecs), dtype=np.int64))
                present.append(np.asarray(pres, bool))
        new_present = np.concatenate(present) if present else np.zeros((0, self.present.shape[1]), bool)
        nb = len(self.meta["blocks"])
        for key, arr in (
            ("ids", ids.astype(np.int64)),
            ("stamps", stamps.astype(np.float64)),
            ("present", new_present.astype(np.uint8).reshape(-1)),
        ):
            name, dtype = SLOT_FILES[key]
            with open(self.folder / name, "r+b") as fh:
                fh.truncate(start * (nb if key == "present" else 1) * np.dtype(dtype).itemsize)
                fh.seek(0, 2)
                fh.write(np.ascontiguousarray(arr, dtype).tobytes())
        self.ids = np.concatenate([self.ids, ids])
        self.stamps = np.concatenate([self.stamps, stamps])
        self.present = np.concatenate([self.present, new_present])

    def _pad(self, x: np.ndarray) -> np.ndarray:
        dp = padded(x.shape[1])
        if dp == x.shape[1]:
            return np.ascontiguousarray(x, np.float32)
        out = np.zeros((len(x), dp), np.float32)
        out[:, : x.shape[1]] = x
        return out

    def gather(self, slots) -> np.ndarray:
        """The exact rows of ``slots`` (float32, in their order): those in the row cache copied from it, the
        others read with ``pread`` (one call per run of consecutive slots; the process maps none of the file,
        and a row not in the page cache costs one read request, where a mapping faults its pages in one at a
        time: twice the time, measured at 1M rows) and kept in the cache.

        The cache (:data:`ROW_CACHE` rows, direct-mapped by slot: a slot's row never changes, rows added get
        new slots) holds what queries read again: the rows a common prompt word names (several hundred per
        word at 1M rows) and the lexical hits of common words recur across prompts, where a row read from a
        file the page cache no longer holds costs a disk read."""
        slots = np.asarray(slots, np.int64)
        width = self.width
        out = np.empty((len(slots), width), np.float32)
        if not len(slots):
            return out
        if self._cache is None:
            size = min(ROW_CACHE, max(len(self.ids), 1))
            self._cache = (np.full(size, -1, np.int64), np.zeros((size, width), np.float32))
        keys, rows = self._cache
        pos = slots % len(keys)
        hit = keys[pos] == slots
        out[hit] = rows[pos[hit]]
        miss = np.flatnonzero(~hit)
        if len(miss):
            want = slots[miss]
            got = np.empty((len(miss), width), np.float32)
            view = memoryview(got).cast("B")
            row = width * 4
            cut = np.flatnonzero(np.diff(want) != 1) + 1
            starts = np.concatenate([[0], cut]).tolist()
            ends = np.concatenate([cut, [len(want)]]).tolist()
            for a, b, s in zip(starts, ends, want[starts].tolist()):
                os.preadv(self._fd, [view[a * row : b * row]], s * row)
            out[miss] = got
            keys[pos[miss]] = want
            rows[pos[miss]] = got
        return out

    # -- searching -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> np.ndarray:
        """The slots of the ``k`` best rows for each query (``[nq, width]``, inner product) in index.faiss and
        in each segment, as one sorted set."""
        if self.index is None or not self.ntotal or not len(queries):
            return np.zeros(0, np.int64)
        dead = self.dead
        q = self._pad(queries)
        found = []
        for index in (self.index, *self.segments):
            if index.ntotal:
                index.nprobe = int(nprobe or min(self.meta["nlist"], NPROBE))
                found.append(index.search(q, int(k) + min(dead, int(k)))[1].ravel())
        found = np.unique(np.concatenate(found))
        found = found[found >= 0]
        return found[self.live[found]]
