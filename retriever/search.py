"""Prompt -> ranked adapters: every signal scored over the whole catalog, fused, selected.

All dense signals of one base family live in **one matrix** ``[rows, D]`` held in memory, one column block
per signal (text: ``d``; training-free weights: ``DIRECTIONS x d``; learned weights: ``d``; preview: the
open_clip width). A query is one matrix product with ``[D, C]`` (one column for the text vector, one for
the learned block, one per prompt token and weight direction, one for the preview), then per-signal
reductions, the lexical scores from FTS5, fusion and an exact top-k.

Two stages. Stage 1 proposes candidates: up to :data:`~.vector_index.EXACT_ROWS` rows (a user's folder) the
exact fused score of every row from the in-memory float32 matrix, ``argpartition`` keeping the best
``max(RESCORE, 4 k)``; above, the family's FAISS index on disk (:mod:`.vector_index`), queried with the fused
score read as one inner product (:meth:`Retriever._index_candidates`), plus every lexical hit (the best
:data:`LEXICAL_HITS_INDEXED` by BM25, scored from the words the FTS5 query returns, on a second read-only
connection in a worker thread while FAISS searches: both release the GIL). Stage 2 (the candidates only):
exact float32 rescoring of every signal, fusion and the final top-k, the same code on both paths
(``tests/test_retriever_index.py`` checks the index's top-20 against the exact scan). ``Retriever.stages``
holds the last query's milliseconds per stage.

Fusion (noisy-OR of calibrated scores)::

    fused = 1 - prod_s (1 - w_s * c_s)        c_s in [0, 1]; w: lexical 1, weights 1, text 0.8, learned 0.8, preview 0.8

One strong signal is enough (an undescribed file can be found by its weights alone), and agreeing signals
add up; a signal a row lacks counts 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lora_composer.retriever.phrases import Vocabulary, stored_vocabulary, tokens
from lora_composer.retriever.row_vectors import CatalogVectors, LazyRows, RowCache, SlotMap
from lora_composer.retriever.selection import Selection
from lora_composer.retriever.selection import select as select_by_coverage
from lora_composer.retriever.signals import lexical
from lora_composer.retriever.signals import text as tsig
from lora_composer.retriever.signals import weights as wsig
from lora_composer.retriever.signals.weights import DIRECTIONS
from lora_composer.retriever.vector_index import EXACT_ROWS, VectorIndex
from lora_composer.vocab import DEFAULT_LORA_WEIGHT

SIGNAL_WEIGHTS = {"lexical": 1.0, "weights": 1.0, "text": 0.8, "learned": 0.8, "preview": 0.8}
RESCORE = 512
INDEX_K = 16  # rows each vector-index query proposes (the union is rescored exactly; 32 before, same recall)
LEXICAL_HITS_INDEXED = 200  # FTS5 hits (best BM25 first) scored lexically on the vector-index path (500 below)
INCLUDE_PER_WORD = 32  # a large catalog's rows named by one prompt word that selection sees (the best fused)
COMMON_WORD_ROWS = LEXICAL_HITS_INDEXED
"""On the vector-index path (a catalog above :data:`~.vector_index.EXACT_ROWS` rows), a prompt word more rows
contain than this is left out of the FTS5 query, and a word naming more rows (trigger, name or description
word: :meth:`.phrases.Vocabulary.rows_by_word`) adds none of them to the candidates.

Why this bound: the lexical stage keeps :data:`LEXICAL_HITS_INDEXED` hits, so a word more rows contain cannot
bring its rows in whole; which of them come would be decided by BM25's length normalisation among rows that
match alike, not by the prompt. Such a word names a kind of adapter, not one adapter, and the dense signals,
which rank every row, choose among its rows (the vector index proposes the best of them by fused score); yet
it costs the most: BM25 of every match (four words each in ~2,800 of a million rows: 11,000 scores, most of a
query's CPU) and one read of every row it names (~400 per trigger word there). The bound is that budget, not
a share of the catalog, so a word is treated alike at 30,000 and 3,000,000 rows, and it keeps what a user
expects: a name or trigger word at most this many files share is always matched, its rows always read and
claimable, and a row the rare words find is scored against every prompt word, the common ones too
(``lexical.score_row``). The in-memory path (small catalogs) scores every match and is unchanged."""
DEFAULT_MIN_SCORE = 0.3  # the fused-score floor of a plain ``search`` listing (selection uses per-kind thresholds)
DEFAULT_TOP_K = 4


class _Laps:
    """Adds the milliseconds since the previous lap to ``stages[name]``."""

    def __init__(self, stages: dict):
        import time

        self.stages, self.clock = stages, time.perf_counter
        self.t = self.clock()

    def __call__(self, name: str) -> None:
        t = self.clock()
        self.stages[name] = self.stages.get(name, 0.0) + (t - self.t) * 1000
        self.t = t


@dataclass
class Match:
    row: object  # catalog.Row
    score: float
    signals: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)  # dense signal -> the prompt token it responds to most
    span: str | None = None  # after selection: the prompt words this pick covers
    claim: object = None  # after selection: its phrases.Claim

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def path(self) -> str:
        return self.row.path

    @property
    def weight(self) -> float:
        w = self.row.preferred_weight
        return float(w) if w is not None else DEFAULT_LORA_WEIGHT

    @property
    def reason(self) -> str:
        """Selected: ``covers "x y" (trigger "x y")``; else the strongest signals, strongest first:
        ``trigger "x" in prompt; weights respond to "castle" (0.82)``."""
        if self.claim is not None:
            return f'covers "{self.span}" ({self.claim.evidence}, {self.claim.score:.2f})'
        ranked = sorted(
            (s for s in self.signals if self.signals[s] > 0), key=lambda s: -SIGNAL_WEIGHTS[s] * self.signals[s]
        )
        return "; ".join(self.reasons.get(s, s) for s in ranked[:2]) or "no signal"


class SparseScores:
    """Scores of a few slots (the lexical hits of a vector-indexed catalog), 0 elsewhere: ``scores[slots]``
    reads them as a dense array would, without one entry per catalog row."""

    def __init__(self, slots: np.ndarray, values: np.ndarray):
        order = np.argsort(slots, kind="stable")
        self.slots = np.asarray(slots, np.int64)[order]
        self.values = np.asarray(values, np.float32)[order]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        if not len(self.slots):
            return np.zeros(idx.shape, np.float32)
        at = np.minimum(np.searchsorted(self.slots, idx), len(self.slots) - 1)
        return np.where(self.slots[at] == idx, self.values[at], np.float32(0))


class _Scattered:
    """Row ``j`` of the candidates, read from the part (gathered array) that holds it."""

    def __init__(self, n: int, parts: list):
        self.part = np.zeros(n, np.int64)
        self.row = np.zeros(n, np.int64)
        self.arrays = [rows for _, rows in parts]
        for p, (at, _) in enumerate(parts):
            self.part[at] = p
            self.row[at] = np.arange(len(at))

    def __getitem__(self, key):
        j, cols = key
        return self.arrays[int(self.part[j])][int(self.row[j]), cols]


class Retriever:
    """Search one catalog for one pipeline family, with that pipeline's text encoder."""

    def __init__(self, catalog, encoder, family: str | None = None, learned=None, preview=None, source=None):
        self.catalog = catalog
        self.encoder = encoder
        self.family = family or getattr(encoder, "family", None) or getattr(source, "family", None)
        self.learned = learned
        self.preview = preview
        self._version = None
        self.rows: list = []
        self._n = 0
        self.index = None
        self.source = source  # the rows' vectors (default: the catalog's, :class:`CatalogVectors`)
        self.exact_rows = EXACT_ROWS
        self.stages: dict[str, float] = {}  # the last query's milliseconds per stage (the benchmark reports them)
        from lora_composer.retriever import calibration

        self.thresholds = dict(calibration.DEFAULT_THRESHOLDS)  # claim kind -> floor (selection)

    # -- the matrix ------------------------------------------------------------------------------
    def refresh(self) -> None:
        if self.catalog.version() == self._version:
            return
        src = self.source or CatalogVectors(self.catalog, self.encoder, self.family, self.learned, self.preview)
        src.ensure()  # may embed rows (and so change the version)
        version = self.catalog.version()
        self.blocks = dict(src.blocks)
        if self.catalog.family_count(self.family) > self.exact_rows:
            self.open_index(src)
        else:
            ids, _ = self.catalog.family_ids(self.family)
            m, pres = src.fetch(ids)
            present = {name: pres[:, b].copy() for b, name in enumerate(src.blocks)}
            self.set_matrix(self.catalog.rows(self.family), m, present, src.dim)
        self._version = version
        from lora_composer.retriever import calibration

        self.thresholds = calibration.load(self.catalog, self.encoder.id) or dict(calibration.DEFAULT_THRESHOLDS)
        self.calibrated = calibration.load(self.catalog, self.encoder.id) is not None

    def set_matrix(self, rows, matrix: np.ndarray, present: dict[str, np.ndarray], dim: int) -> None:
        """Install rows and their in-memory matrix: stage 1 is the exact scan (the benchmark and the tests
        build synthetic ones directly)."""
        self.index = None
        self.rows = rows
        self._n = len(rows)
        self.by_id = {r.id: i for i, r in enumerate(rows)}
        self.rows_by_id = {r.id: r for r in rows}
        self.matrix = matrix
        self.present = present
        self.dim = dim
        self.vocab = Vocabulary(rows)

    def open_index(self, src, rebuild: bool = False) -> None:
        """Stage 1 on the family's on-disk vector index (:mod:`.vector_index`), brought up to date with the
        catalog incrementally (built the first time, or with ``rebuild``); rows, vocabulary and vectors are
        read on demand, so opening a large catalog reads neither every row nor every vector."""
        folder = self.catalog.path.parent / "vectors" / src.key
        vi = VectorIndex(folder)
        uid = self.catalog.get_meta("uid") or ""
        fresh = rebuild or not vi.exists
        if not fresh:
            try:
                vi.open()
            except ValueError as e:  # derived data: rebuilt from the catalog, and said why
                import sys

                print(f"lora-composer: {e}", file=sys.stderr)
                fresh = True
        if not fresh:
            fresh = (
                vi.meta.get("uid") != uid
                or vi.width != src.width
                or vi.meta.get("blocks") != {k: list(v) for k, v in src.blocks.items()}
            )
        if fresh:
            ids, stamps = self.catalog.family_ids(self.family)
            vi.build(ids, stamps, src.fetch, src.width, src.blocks, uid)
        else:
            vi.sync(self.catalog, self.family, src.fetch)
        self.index = vi
        cache = RowCache(self.catalog)
        self.rows = LazyRows(vi.ids, cache)
        self._n = len(vi.ids)
        self.by_id = SlotMap(vi.ids)
        self.rows_by_id = cache
        self.matrix = vi.vectors
        self.present = {name: vi.present[:, b] for b, name in enumerate(src.blocks)}
        self.dim = src.dim
        held = getattr(self, "vocab", None) if getattr(self, "_index_folder", None) == folder else None
        self.vocab = stored_vocabulary(self.catalog, self.family, folder, cache, held=held)
        self._index_folder = folder

    def rebuild_index(self) -> None:
        """Build the vector index again from the catalog (``compose index --rebuild``)."""
        src = self.source or CatalogVectors(self.catalog, self.encoder, self.family, self.learned, self.preview)
        src.ensure()
        self.open_index(src, rebuild=True)
        self._version = self.catalog.version()

    # -- scoring ---------------------------------------------------------------------------------
    def _query_matrix(self, enc, text_q, preview_q) -> tuple[np.ndarray, dict]:
        d = self.dim
        tokens = enc.tokens.numpy().astype(np.float32) if enc is not None else np.zeros((0, d), np.float32)
        T = tokens.shape[0]
        cols: dict[str, slice] = {}
        parts = []
        D = self.matrix.shape[1]

        def add(name, block_rows: np.ndarray, offset: int):
            q = np.zeros((D, block_rows.shape[1]), np.float32)
            q[offset : offset + block_rows.shape[0]] = block_rows
            cols[name] = slice(sum(p.shape[1] for p in parts), sum(p.shape[1] for p in parts) + block_rows.shape[1])
            parts.append(q)

        if text_q is not None:
            add("text", text_q[:, None], self.blocks["text"][0])
            if "learned" in self.blocks:
                add("learned", text_q[:, None], self.blocks["learned"][0])
        if T:
            a = self.blocks["weights"][0]
            for j in range(DIRECTIONS):
                add(f"w{j}", tokens.T, a + j * d)
        if preview_q is not None and "preview" in self.blocks:
            add("preview", preview_q[:, None], self.blocks["preview"][0])
        q = np.concatenate(parts, 1) if parts else np.zeros((D, 0), np.float32)
        return q, cols

    def _product(self, rows: np.ndarray, q: np.ndarray, cols: dict) -> np.ndarray:
        """``rows @ q`` one column block at a time: each column of ``q`` is zero outside its signal's block
        (:meth:`_query_matrix`), so the product reads only that block (the text column 768 of the 2,304 columns
        of an SD1.5 row, each token column one weight direction's 768): a third of the full product's work."""
        d = self.dim
        out = np.empty((len(rows), q.shape[1]), np.float32)
        for name, sl in cols.items():
            if name.startswith("w") and name[1:].isdigit():
                a, w = self.blocks["weights"][0] + int(name[1:]) * d, d
            else:
                a, w = self.blocks[name]
            out[:, sl] = rows[:, a : a + w] @ q[a : a + w, sl]
        return out

    def _signals(self, s: np.ndarray, cols: dict, idx=None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Calibrated dense scores per signal (for rows ``idx`` or all) and the best token per row."""
        out = {}
        sel = slice(None) if idx is None else idx
        if "text" in cols:
            out["text"] = tsig.calibrate(s[:, cols["text"]][:, 0], self.dim) * self.present["text"][sel]
        if "learned" in cols:
            out["learned"] = (
                tsig.calibrate(np.abs(s[:, cols["learned"]][:, 0]), self.dim) * self.present["learned"][sel]
            )
        best_tok = None
        if "w0" in cols:
            sq = sum(s[:, cols[f"w{j}"]] ** 2 for j in range(DIRECTIONS))  # [n, T]
            cos = np.sqrt(sq)
            best_tok = cos.argmax(1)
            out["weights"] = wsig.calibrate(cos.max(1), self.dim) * self.present["weights"][sel]
            out["_weights_raw"] = cos.max(1)
        if "preview" in cols:
            out["preview"] = np.clip(s[:, cols["preview"]][:, 0], 0, 1) * self.present["preview"][sel]
        return out, best_tok

    @staticmethod
    def _fuse(signals: dict[str, np.ndarray], n: int) -> np.ndarray:
        keep = np.ones(n, np.float32)
        for name, c in signals.items():
            if name.startswith("_"):
                continue
            keep *= 1.0 - SIGNAL_WEIGHTS[name] * c
        return 1.0 - keep

    def search(self, prompt: str, limit: int | None = 20, signals=None, include=()) -> list[Match]:
        """Every row with a positive fused score, best first (at most ``limit``).

        ``signals`` restricts fusion to some signals (the benchmark's per-signal recall); ``include``: row
        positions also returned (after those, any score) wherever they rank."""
        self.refresh()
        if self._n == 0:
            return []
        enc = self.encoder.encode_one(prompt)
        text_q = enc.vector.numpy().astype(np.float32) if enc.vector is not None else None
        preview_q = self.preview.encode_text(prompt) if self.preview is not None else None
        return self.search_encoded(prompt, enc, text_q, preview_q, limit=limit, signals=signals, include=include)

    def search_encoded(self, prompt, enc, text_q, preview_q=None, limit=20, signals=None, include=()) -> list[Match]:
        n = self._n
        lap = _Laps(self.stages)
        q, cols = self._query_matrix(enc, text_q, preview_q)
        k = n if limit is None else min(n, max(limit, 1))
        c = min(n, max(RESCORE, 4 * k))
        pending = None
        if self.index is not None and self._worker() is not None:  # FTS5 (own connection, a worker thread)
            pending = self._worker().submit(self._timed_lexical, prompt)  # beside the vector search
        else:
            lex, lex_all = self._lexical(prompt)
            lap("lexical")
        use = set(signals) if signals is not None else None

        def pick(sig: dict) -> dict:
            return {k: v for k, v in sig.items() if use is None or k.lstrip("_").replace("_raw", "") in use}

        groups = [np.asarray(g, np.int64) for g in include] if include and not np.isscalar(include[0]) else None
        if groups is not None:
            include = np.unique(np.concatenate(groups)) if groups else np.zeros(0, np.int64)
        include = np.unique(np.asarray(include, np.int64).reshape(-1))
        if self.index is not None:  # stage 1 on the vector index, then the lexical hits added
            dense = self._index_candidates(q, cols, use, k)
            lap("stage 1")
            first = np.union1d(dense, include)
            parts = [(first, self.index.gather(first))]  # read while FTS5 runs in its thread
            lap("gather")
            if pending is not None:
                lex, lex_all, ms = pending.result()
                self.stages["lexical"] = self.stages.get("lexical", 0.0) + ms
                lap("lexical wait")
            extra = np.setdiff1d(lex_all.slots, first)
            if len(extra):
                parts.append((extra, self.index.gather(extra)))
            cand = np.union1d(first, extra)
            lap("gather")
        elif c < n and q.shape[1]:
            cand = self._candidates((self.matrix @ q, {}), cols, lex_all, use, c)
        elif c < n:  # no dense column: the lexical hits are all there is
            cand = np.argpartition(-lex_all, c - 1)[:c]
        else:
            cand = np.arange(n)
        if self.index is None:
            lap("stage 1")
            if len(include) and c < n:
                cand = np.union1d(cand, include)
            rows_c = self.matrix[cand]
            lap("gather")
            s_c = rows_c @ q if q.shape[1] else np.zeros((len(cand), 0), np.float32)
        else:  # the products of each part, placed in candidate order (the rows themselves are not copied again)
            s_c = np.zeros((len(cand), q.shape[1]), np.float32)
            where = []
            for slots, rows in parts:
                at = np.searchsorted(cand, slots)
                if q.shape[1]:
                    s_c[at] = self._product(rows, q, cols)
                where.append((at, rows))
            rows_c = _Scattered(len(cand), where)
        sig_c, best_tok = self._signals(s_c, cols, cand)
        sig_c["lexical"] = lex_all[cand]
        fused_c = self._fuse(pick(sig_c), len(cand))
        lap("rescore")
        order = np.argsort(-fused_c, kind="stable")
        top = [int(j) for j in order[:k] if fused_c[j] > 0]
        if groups is not None:  # per group, its best INCLUDE_PER_WORD rows (by fused score)
            best = {int(cand[j]) for j in order[:k]}
            keep = set()
            for g in groups:
                gp = np.searchsorted(cand, g)
                keep.update(int(x) for x in g[np.argsort(-fused_c[gp], kind="stable")[:INCLUDE_PER_WORD]])
            include = np.asarray(sorted(keep - best), np.int64)
        if len(include):  # the rows asked for, wherever they rank
            shown = set(top)
            top += [int(j) for j in np.flatnonzero(np.isin(cand, include)) if j not in shown]
        if hasattr(self.rows, "prefetch"):
            self.rows.prefetch(cand[top])
        out = []
        tok = enc.tokens.numpy() if enc is not None else None
        for j in top:
            i = int(cand[j])
            row = self.rows[i]
            m = Match(row, float(fused_c[j]))
            for name, arr in sig_c.items():
                if name.startswith("_") or (use is not None and name not in use):
                    continue
                if arr[j] > 0:
                    m.signals[name] = float(min(arr[j], 1.0))
            if "lexical" in m.signals and row.id in lex:
                m.reasons["lexical"] = lex[row.id][1]
            if "text" in m.signals:
                m.reasons["text"] = f"description/trigger words close to the prompt ({m.signals['text']:.2f})"
            if "weights" in m.signals and best_tok is not None:
                t = int(best_tok[j])
                word = enc.words[t] if enc is not None and t < len(enc.words) else "?"
                m.reasons["weights"] = f'weights respond to "{word}" ({m.signals["weights"]:.2f})'
                m.tokens["weights"] = word
            if "text" in m.signals and enc is not None and enc.tokens.shape[0] and "text" in self.blocks:
                a, w = self.blocks["text"]
                t = int((tok @ rows_c[j, a : a + w]).argmax())
                m.tokens["text"] = enc.words[t] if t < len(enc.words) else None
            if "learned" in m.signals:
                m.reasons["learned"] = f"learned weight embedding close to the prompt ({m.signals['learned']:.2f})"
            if "preview" in m.signals:
                m.reasons["preview"] = f"preview image matches ({m.signals['preview']:.2f})"
            out.append(m)
        lap("rows")
        return out

    def _worker(self):
        """One thread and one read-only catalog connection for the lexical stage of the vector-index path."""
        if getattr(self, "_pool", None) is None:
            import sqlite3
            from concurrent.futures import ThreadPoolExecutor

            try:
                self._reader = self.catalog.reader()
            except sqlite3.Error:  # e.g. a WAL catalog in a folder this process cannot write: FTS5 in line
                self._pool = False
                return None
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lora-composer-fts")
        return self._pool or None

    def _timed_lexical(self, prompt: str):
        import time

        t0 = time.perf_counter()
        lex, lex_all = self._lexical(prompt, self._reader)
        return lex, lex_all, (time.perf_counter() - t0) * 1000

    def _lexical(self, prompt: str, catalog=None) -> tuple[dict, np.ndarray]:
        """The lexical hits ``{file id: (score, reason, bm25)}`` and their scores by slot (0 elsewhere; ties
        broken by BM25)."""
        limit = LEXICAL_HITS_INDEXED if self.index is not None else 500
        common = COMMON_WORD_ROWS if self.index is not None else None
        lex = lexical.search(
            catalog or self.catalog, prompt, self.rows_by_id, family=self.family, limit=limit, common=common
        )
        if hasattr(self.by_id, "lookup"):  # a vector-indexed catalog: the hits only, no array of every slot
            if not lex:
                return lex, SparseScores(np.zeros(0, np.int64), np.zeros(0, np.float32))
            vals = np.asarray([sc + 1e-6 * min(bm, 100.0) for sc, _, bm in lex.values()], np.float32)
            slots, ok = self.by_id.lookup(list(lex))
            return lex, SparseScores(slots, vals[ok])
        lex_all = np.zeros(self._n, np.float32)
        if not lex:
            return lex, lex_all
        vals = np.asarray([sc + 1e-6 * min(bm, 100.0) for sc, _, bm in lex.values()], np.float32)
        for v, fid in zip(vals, lex):
            slot = self.by_id.get(fid)
            if slot is not None:
                lex_all[slot] = v
        return lex, lex_all

    def scan_all(self, prompt, enc, text_q, preview_q=None, limit: int = 20, chunk: int = 50_000) -> list[tuple]:
        """The reference the vector index is measured against: the exact fused score of every live row (read in
        chunks, never mapped whole), ``(file id, score)`` of the best ``limit`` with a positive score, best
        first."""
        return self.scan_all_many([(prompt, enc, text_q, preview_q)], limit, chunk)[0]

    def scan_all_many(self, queries, limit: int = 20, chunk: int = 50_000) -> list[list[tuple]]:
        """:meth:`scan_all` of several ``(prompt, enc, text_q, preview_q)`` in one read of the rows."""
        self.refresh()
        qs = []
        for prompt, enc, text_q, preview_q in queries:
            q, cols = self._query_matrix(enc, text_q, preview_q)
            qs.append((q, cols, self._lexical(prompt)[1]))
        best = [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in qs]
        for a in range(0, self._n, chunk):
            idx = np.arange(a, min(self._n, a + chunk))
            if self.index is not None:
                with open(self.index.folder / "vectors.f32", "rb") as fh:
                    fh.seek(a * self.index.width * 4)
                    block = np.fromfile(fh, np.float32, len(idx) * self.index.width).reshape(len(idx), -1)
            else:
                block = self.matrix[a : a + len(idx)]
            for j, (q, cols, lex_all) in enumerate(qs):
                sig, _ = self._signals(
                    self._product(block, q, cols) if self.index is not None else block @ q, cols, idx
                )
                sig["lexical"] = lex_all[idx]
                fused = self._fuse(sig, len(idx))
                if self.index is not None:
                    fused[~self.index.live[idx]] = 0
                top = np.argsort(-fused, kind="stable")[:limit]
                scores, slots = np.concatenate([best[j][0], fused[top]]), np.concatenate([best[j][1], idx[top]])
                keep = np.argsort(-scores, kind="stable")[:limit]
                best[j] = (scores[keep], slots[keep])
        return [[(self.rows[int(i)].id, float(sc)) for i, sc in zip(slots, scores) if sc > 0] for scores, slots in best]

    def _index_candidates(self, q: np.ndarray, cols: dict, use, k: int) -> np.ndarray:
        """Stage 1 on the vector index: the fused dense score read as one inner product. Each signal's
        calibrated score is linear in its raw cosine above chance, so ``sum_s w_s c_s`` ranks like
        ``<[w_text q_text, w_weights t, ...], row>``. The weight signal pairs one prompt token with one weight
        direction of either sign (a delta has no sign), so there is one query per (token, direction, sign)
        over the text (and learned, preview) part, and one without it (rows without text sit in inverted
        lists whose centres have none, which a text-weighted query does not probe); the learned block, read
        as ``|cos|``, adds its mirrored query. The union of their best :data:`INDEX_K` rows is rescored
        exactly by the caller."""
        width = self.index.width
        on = lambda name: use is None or name in use  # noqa: E731
        base = np.zeros(width, np.float32)
        if "text" in cols and on("text"):
            base += SIGNAL_WEIGHTS["text"] / (1 - tsig.chance(self.dim)) * q[:, cols["text"].start]
        if "preview" in cols and on("preview"):
            base += SIGNAL_WEIGHTS["preview"] * q[:, cols["preview"].start]
        queries = [base]
        if "learned" in cols and on("learned"):
            lq = SIGNAL_WEIGHTS["learned"] / (1 - tsig.chance(self.dim)) * q[:, cols["learned"].start]
            queries = [base + lq, base - lq]
        if "w0" in cols and on("weights"):
            ww = SIGNAL_WEIGHTS["weights"] / (1 - wsig.chance(self.dim))
            for j in range(DIRECTIONS):
                toks = ww * q[:, cols[f"w{j}"]].T  # [T, width]
                queries += [queries[0] + toks, queries[0] - toks]
                if base.any():  # and alone: an inverted list is probed by its centre, and the lists of rows
                    queries += [toks, -toks]  # without text (undescribed files) score low on a text query
        queries = np.concatenate([np.atleast_2d(x) for x in queries])
        queries = queries[np.abs(queries).sum(1) > 0]
        return self.index.search(queries, max(INDEX_K, k))

    def _candidates(self, product, cols: dict, lex_all: np.ndarray, use, c: int) -> np.ndarray:
        """Stage 1: the ``c`` rows with the best fused score on the compact matrix.

        The reductions over the ``[n, C]`` product run in numpy, single-threaded on purpose: on a small shared machine a multi-threaded elementwise op over
        100K rows waits for a second core's time slice (milliseconds each), more than the op itself."""
        n = self._n
        s, post = product

        def column(name, col):
            raw = s[:, col].astype(np.float32)
            if name in post:
                raw *= post[name]
            return raw

        keep = np.ones(n, np.float32)

        def fold(name, raw, chance):
            if use is not None and name not in use:
                return
            raw -= chance
            raw *= SIGNAL_WEIGHTS[name] / (1.0 - chance)
            np.clip(raw, 0.0, SIGNAL_WEIGHTS[name], out=raw)
            raw *= self.present[name]
            keep[:] *= 1.0 - raw

        if "text" in cols:
            fold("text", column("text", cols["text"].start), tsig.chance(self.dim))
        if "learned" in cols:  # a delta has no sign: the learned embedding is an axis (|cos|)
            fold("learned", np.abs(column("learned", cols["learned"].start)), tsig.chance(self.dim))
        if "w0" in cols:
            sq = None
            for j in range(DIRECTIONS):
                part = np.ascontiguousarray(s[:, cols[f"w{j}"]].T, dtype=np.float32)  # [T, n]: reduce over T fast
                part *= part
                sq = part if sq is None else sq.__iadd__(part)
            raw = np.sqrt(sq.max(0))
            if "weights" in post:
                raw *= post["weights"]
            fold("weights", raw, wsig.chance(self.dim))
        if "preview" in cols and (use is None or "preview" in use):
            raw = np.clip(column("preview", cols["preview"].start), 0.0, 1.0) * self.present["preview"]
            keep *= 1.0 - SIGNAL_WEIGHTS["preview"] * raw
        if use is None or "lexical" in use:
            hit = np.flatnonzero(lex_all)
            keep[hit] *= 1.0 - SIGNAL_WEIGHTS["lexical"] * lex_all[hit]
        return np.argpartition(keep, c - 1)[:c]  # the c smallest "keep" = the c best fused scores

    def select(self, prompt: str, top_k: int = DEFAULT_TOP_K, min_score: float | None = None) -> Selection:
        """The adapters the prompt names, by coverage (:mod:`.selection`), at most ``top_k``; ``min_score``
        replaces every calibrated per-kind threshold."""
        thresholds = self.thresholds_for(min_score)
        found = self.candidates(prompt, top_k, thresholds)
        lap = _Laps(self.stages)
        out = select_by_coverage(prompt, found, self.vocab, top_k, thresholds)
        lap("selection")
        return out

    def thresholds_for(self, min_score: float | None = None) -> dict:
        self.refresh()
        if min_score is not None:
            return {k: float(min_score) for k in self.thresholds}
        return dict(self.thresholds)

    def candidates(self, prompt: str, top_k: int = DEFAULT_TOP_K, thresholds: dict | None = None) -> list[Match]:
        """The search's best ``max(4 top_k, 20)`` matches, plus every row whose phrase or description word the
        prompt contains (:meth:`Vocabulary.rows_for`: also a plural or prefix the full-text index cannot see;
        with ``thresholds``, a description word too common to reach its threshold is skipped; on the
        vector-index path, a word naming more than :data:`COMMON_WORD_ROWS` rows too), those rescored with the
        rest. The work grows with these candidates, not with the catalog."""
        self.refresh()
        floor = (thresholds or {}).get("description", 0.0)
        self.stages.clear()
        lap = _Laps(self.stages)
        if self.index is None:
            named = self.vocab.rows_for(tokens(prompt), floor)
            include = [self.by_id[i] for i in named if i in self.by_id]
        else:  # per prompt word: its best INCLUDE_PER_WORD rows (by fused score); none past COMMON_WORD_ROWS
            include = [
                self.by_id.slots_of(rows)
                for rows in self.vocab.rows_by_word(tokens(prompt), floor).values()
                if len(rows) <= COMMON_WORD_ROWS
            ]
        lap("vocabulary")
        return self.search(prompt, limit=max(4 * top_k, 20), include=include)


def recall_at(found: list, exact: list[tuple], digits: int = 5) -> float:
    """Tie-aware recall of a ranking against the exact one (``scan_all``): the share of the exact top rows
    whose score the found list holds too (scores rounded to ``digits``; of several rows with one score,
    which one comes first is arbitrary, so any of them counts). ``found``: ``Match``es, rescored exactly."""
    from collections import Counter

    if not exact:
        return 1.0
    have = Counter(round(m.score, digits) for m in found)
    want = Counter(round(s, digits) for _, s in exact)
    return sum((have & want).values()) / len(exact)


def format_table(matches: list[Match], root=None) -> str:
    """The ``compose search`` table."""
    import os

    header = ("#", "name", "kind", "score", "signals", "trigger words", "path")
    lines = []
    for i, m in enumerate(matches, 1):
        sig = " ".join(f"{k[:3]}={v:.2f}" for k, v in sorted(m.signals.items(), key=lambda kv: -kv[1]))
        trig = ", ".join(m.row.trigger_words[:4]) + (" ..." if len(m.row.trigger_words) > 4 else "")
        path = m.path
        if root is not None:
            try:
                path = os.path.relpath(path, root)
            except ValueError:
                pass
        lines.append((str(i), m.name, getattr(m.row, "kinds", "") or "?", f"{m.score:.3f}", sig, trig, path))
    widths = [max(len(h), *(len(r[c]) for r in lines)) if lines else len(h) for c, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in lines]
    return "\n".join(out)


def format_selection(chosen: Selection) -> str:
    """``--loras auto``'s choice: each pick with the prompt span it covers, then why the others were left out."""
    if chosen:
        lines = ["--loras auto would use: " + "; ".join(f"{m.name}:{m.weight:g}" for m in chosen)]
        lines += [f"  {m.name}: {m.reason}" for m in chosen]
    else:
        lines = ["--loras auto would use: none (no adapter's phrase or signal reaches its threshold)"]
    shown = [lo for lo in chosen.left_out if lo.match.signals or not lo.why.startswith("below")]
    if shown:
        lines.append("left out:")
        lines += [f"  {lo.match.name}: {lo.why}" for lo in shown]
    if chosen.notice:
        lines.append(chosen.notice)
    return "\n".join(lines)
