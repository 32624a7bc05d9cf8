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

- ``index.faiss``: the IVF-PQ index, ids = slots;
- ``vectors.f32``: every slot's exact float32 row, append-only, opened as a read-only ``np.memmap`` (only the
  candidates' pages are read);
- ``slots.npz``: per slot the catalog file id (-1 once removed), its ``indexed_at`` stamp, the per-block
  ``present`` flags;
- ``meta.json``: width, blocks, catalog uid, slot count.

Updates are incremental: new or changed rows are appended (their vectors written, ``add_with_ids``), removed
ones marked dead (a tombstone: searches skip them; FAISS's ``remove_ids`` on fast-scan lists damaged the
codes of rows added after it, ``tests/test_retriever_index.py``); :meth:`VectorIndex.build` (``compose index
--rebuild``) starts over, which also reclaims dead slots.
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
NPROBE = 24  # lists searched per query
CHUNK = 10_000  # rows fetched, encoded and added at a time (bounded memory for 1M-row builds)


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
        self.index = None
        self.vectors = None

    # -- files -----------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.folder / "meta.json").is_file() and (self.folder / "index.faiss").is_file()

    def open(self, mmap: bool = True) -> "VectorIndex":
        """Read the index (memory-mapped where FAISS can) and map the vectors read-only."""
        import faiss

        def read(name, how):
            try:
                return how(self.folder / name)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                why = " ".join(str(e).split())[:200]
                raise ValueError(f"{self.folder / name}: unreadable ({why}); compose index --rebuild rebuilds it") from e

        self.meta = read("meta.json", lambda p: json.loads(p.read_text()))
        slots = read("slots.npz", lambda p: dict(np.load(p)))
        self.ids, self.stamps, self.present = slots["ids"], slots["stamps"], slots["present"]
        self.index = read("index.faiss", lambda p: faiss.read_index(str(p), faiss.IO_FLAG_MMAP if mmap else 0))
        if len(self.ids) != self.meta["slots"] or self.present.shape[0] != len(self.ids):
            raise ValueError(f"{self.folder / 'slots.npz'}: slots: {len(self.ids)} rows, meta.json says {self.meta['slots']}")
        self._map()
        return self

    def _map(self) -> None:
        n, width = int(self.meta["slots"]), int(self.meta["width"])
        f = self.folder / "vectors.f32"
        if f.stat().st_size < n * width * 4:
            raise ValueError(f"{f}: {f.stat().st_size} bytes, {n} slots x {width} float32 need {n * width * 4}")
        self.vectors = np.memmap(f, np.float32, "r", shape=(n, width)) if n else np.zeros((0, width), np.float32)
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
        self._fd = os.open(f, os.O_RDONLY)

    def _write_state(self) -> None:
        import faiss

        tmp = self.folder / "index.faiss.tmp"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, self.folder / "index.faiss")
        with open(self.folder / "slots.tmp.npz", "wb") as fh:
            np.savez(fh, ids=self.ids, stamps=self.stamps, present=self.present)
        os.replace(self.folder / "slots.tmp.npz", self.folder / "slots.npz")
        self.meta["slots"] = int(len(self.ids))
        (self.folder / "meta.tmp.json").write_text(json.dumps(self.meta))
        os.replace(self.folder / "meta.tmp.json", self.folder / "meta.json")

    # -- building and updating -------------------------------------------------------------------
    @property
    def width(self) -> int:
        return int(self.meta["width"])

    @property
    def live(self) -> np.ndarray:
        return self.ids >= 0

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
        self.meta = {"width": int(width), "blocks": {k: list(v) for k, v in blocks.items()}, "uid": uid, "slots": 0,
                     "nlist": nlist_for(n), "format": 1}
        (self.folder / "vectors.f32").write_bytes(b"")
        self.ids = np.zeros(0, np.int64)
        self.stamps = np.zeros(0, np.float64)
        self.present = np.zeros((0, len(blocks)), bool)
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
        self.index = index
        self._append(ids, np.asarray(stamps, np.float64), fetch)
        self._write_state()
        self._map()

    def update(self, ids, stamps, fetch) -> tuple[int, int]:
        """Bring the index to exactly the live rows ``ids`` (with ``stamps``): rows whose id or stamp is new are
        appended, rows no longer there (or re-stamped) marked dead. Returns ``(added, removed)``. Work: the changed
        rows (plus one write of the index file)."""
        ids = np.asarray(ids, np.int64)
        stamps = np.asarray(stamps, np.float64)
        live = np.flatnonzero(self.live)
        have = dict(zip(self.ids[live].tolist(), zip(live.tolist(), self.stamps[live].tolist())))
        want = dict(zip(ids.tolist(), stamps.tolist()))
        gone = [slot for fid, (slot, st) in have.items() if want.get(fid) != st]
        new = [i for i, (fid, st) in enumerate(zip(ids.tolist(), stamps.tolist())) if have.get(fid, (None, None))[1] != st]
        if not gone and not new:
            return 0, 0
        self.index = self._writable()
        if gone:  # tombstones: FAISS's remove_ids on fast-scan lists corrupted codes of rows added after it
            self.ids = self.ids.copy()
            self.ids[np.asarray(sorted(gone), np.int64)] = -1
        if new:
            sel = np.asarray(new, np.int64)
            self._append(ids[sel], stamps[sel], fetch)
        self._write_state()
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
        self.index = self._writable()
        self._append(ids, stamps, fetch)
        self._write_state()
        self._map()
        return len(ids), 0

    def _writable(self):
        import faiss

        return faiss.read_index(str(self.folder / "index.faiss"))

    def _append(self, ids: np.ndarray, stamps: np.ndarray, fetch) -> None:
        """Write the rows' vectors at the end of ``vectors.f32`` (plain writes: a mapping would keep every
        written page in this process's resident memory) and add them to the index, a chunk at a time."""
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
                    raise ValueError(f"{f}: vectors of shape {vecs.shape}, expected ({min(CHUNK, len(ids) - a)}, {width})")
                fh.write(vecs.tobytes())
                self.index.add_with_ids(self._pad(vecs), np.arange(start + a, start + a + len(vecs), dtype=np.int64))
                present.append(np.asarray(pres, bool))
        self.ids = np.concatenate([self.ids, ids])
        self.stamps = np.concatenate([self.stamps, stamps])
        if present:
            self.present = np.concatenate([self.present, *present])

    def _pad(self, x: np.ndarray) -> np.ndarray:
        dp = padded(x.shape[1])
        if dp == x.shape[1]:
            return np.ascontiguousarray(x, np.float32)
        out = np.zeros((len(x), dp), np.float32)
        out[:, : x.shape[1]] = x
        return out

    def gather(self, slots) -> np.ndarray:
        """The exact rows of ``slots`` (float32), read with ``pread`` into one buffer: a query's candidates
        cost one read each, and the process maps none of the file (its pages stay in the shared page cache,
        not in this process's resident memory)."""
        slots = np.asarray(slots, np.int64)
        width = self.width
        out = np.empty((len(slots), width), np.float32)
        view = memoryview(out).cast("B")
        row = width * 4
        for k, s in enumerate(slots.tolist()):
            os.preadv(self._fd, [view[k * row : (k + 1) * row]], s * row)
        return out

    # -- searching -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> np.ndarray:
        """The slots of the ``k`` best rows for each query (``[nq, width]``, inner product), as one sorted set."""
        if self.index is None or not self.index.ntotal or not len(queries):
            return np.zeros(0, np.int64)
        self.index.nprobe = int(nprobe or min(self.meta["nlist"], NPROBE))
        dead = len(self.ids) - int(self.live.sum())
        _, found = self.index.search(self._pad(queries), int(k) + min(dead, int(k)))
        found = np.unique(found)
        found = found[found >= 0]
        return found[self.live[found]]
