"""Prompt -> ranked adapters: every signal scored over the whole catalog, fused, selected.

All dense signals of one base family live in **one matrix** ``[rows, D]`` held in memory, one column block
per signal (text: ``d``; training-free weights: ``DIRECTIONS x d``; learned weights: ``d``; preview: the
open_clip width). A query is one matrix product with ``[D, C]`` (one column for the text vector, one for
the learned block, one per prompt token and weight direction, one for the preview), then per-signal
reductions, the lexical scores from FTS5, fusion and an exact top-k.

The scan is two-stage. Stage 1 (over all rows): the product (torch) on a compact copy of the matrix, the
calibrated per-signal scores and the fused score (numpy, in place), then ``argpartition`` keeps the best
``max(RESCORE, 4 k)`` candidates. Stage 2 (numpy, candidates only): exact float32 rescoring and the final
top-k. Up to :data:`BF16_ROWS` rows the compact copy is the float32 matrix itself (stage 1 is exact); above
it, the copy is int8 with one scale per row and column block (a quarter of the float32 memory traffic,
``torch._int_mm``; bfloat16 where int8 matmul is unavailable) when that is faster on this CPU than float32
(probed once per load, :func:`_fastest_scan`: without VNNI ``_int_mm`` is ~10x slower). Quantisation
moves a cosine by about 1e-3, so a row outside the candidates would have to be within that of the k-th
best fused score *and* behind :data:`RESCORE` others: the final ranking and scores are the exact ones
(``tests/test_retriever.py::test_bf16_scan_matches_exact_ranking``).

Fusion (noisy-OR of calibrated scores)::

    fused = 1 - prod_s (1 - w_s * c_s)        c_s in [0, 1]; w: lexical 1, weights 1, text 0.8, learned 0.8, preview 0.8

One strong signal is enough (an undescribed file can be found by its weights alone), and agreeing signals
add up; a signal a row lacks counts 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lora_composer.retriever.phrases import Vocabulary, tokens
from lora_composer.retriever.selection import Selection
from lora_composer.retriever.selection import select as select_by_coverage
from lora_composer.retriever.signals import lexical
from lora_composer.retriever.signals import text as tsig
from lora_composer.retriever.signals import weights as wsig
from lora_composer.retriever.signals.weights import DIRECTIONS
from lora_composer.vocab import DEFAULT_LORA_WEIGHT

SIGNAL_WEIGHTS = {"lexical": 1.0, "weights": 1.0, "text": 0.8, "learned": 0.8, "preview": 0.8}
BF16_ROWS = 20_000  # above this many rows stage 1 scans the compact (int8) copy
RESCORE = 512
DEFAULT_MIN_SCORE = 0.3  # the fused-score floor of a plain ``search`` listing (selection uses per-kind thresholds)
DEFAULT_TOP_K = 4


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


class Retriever:
    """Search one catalog for one pipeline family, with that pipeline's text encoder."""

    def __init__(self, catalog, encoder, family: str | None = None, learned=None, preview=None):
        self.catalog = catalog
        self.encoder = encoder
        self.family = family or encoder.family
        self.learned = learned
        self.preview = preview
        self._version = None
        self.rows: list = []
        from lora_composer.retriever import calibration

        self.thresholds = dict(calibration.DEFAULT_THRESHOLDS)  # claim kind -> floor (selection)

    # -- the matrix ------------------------------------------------------------------------------
    def refresh(self) -> None:
        version = self.catalog.version()
        if version == self._version:
            return
        self.catalog.ensure_text_embeddings(self.encoder, self.family)
        rows = self.catalog.rows(self.family)
        text = self.catalog.embeddings("text", self.encoder.id)
        d = int(self.encoder.mean.shape[-1])
        blocks: list[tuple[str, int]] = [("text", d), ("weights", DIRECTIONS * d)]
        learned = None
        if self.learned is not None:
            if hasattr(self.learned, "ensure_embeddings"):
                self.learned.ensure_embeddings(self.catalog, self.family)
            learned = self.catalog.embeddings("learned", self.learned.id)
            blocks.append(("learned", d))
        preview = None
        if self.preview is not None:
            from lora_composer.retriever.signals import preview as preview_mod

            preview_mod.ensure_embeddings(self.catalog, self.preview, self.family)
            preview = self.catalog.embeddings("preview", self.preview.id)
            blocks.append(("preview", self.preview.dim))
        self.blocks, start = {}, 0
        for name, width in blocks:
            self.blocks[name] = (start, width)
            start += width
        n = len(rows)
        m = np.zeros((n, start), np.float32)
        present = {name: np.zeros(n, bool) for name, _ in blocks}

        def put(name, i, vec):
            a, w = self.blocks[name]
            if vec is not None and vec.size == w:
                m[i, a : a + w] = vec.reshape(-1)
                present[name][i] = True

        for i, r in enumerate(rows):
            put("text", i, text.get(r.id))
            if r.weight_dirs is not None and r.weight_dirs.shape[1] == d:
                put("weights", i, r.weight_dirs[:DIRECTIONS])
            if learned is not None:
                put("learned", i, learned.get(r.id))
            if preview is not None:
                put("preview", i, preview.get(r.id))
        self.set_matrix(rows, m, present, d)
        self._version = version
        from lora_composer.retriever import calibration

        self.thresholds = calibration.load(self.catalog, self.encoder.id) or dict(calibration.DEFAULT_THRESHOLDS)
        self.calibrated = calibration.load(self.catalog, self.encoder.id) is not None

    def set_matrix(self, rows, matrix: np.ndarray, present: dict[str, np.ndarray], dim: int) -> None:
        """Install rows and their matrix (the benchmark builds synthetic ones directly)."""
        self.rows = rows
        self.by_id = {r.id: i for i, r in enumerate(rows)}
        self.rows_by_id = {r.id: r for r in rows}
        self.matrix = matrix
        self.present = present
        self.dim = dim
        self.vocab = Vocabulary(rows)
        self.scan, self.row_scale = _compact(matrix, self.blocks, len(rows) > BF16_ROWS)  # row_scale: numpy

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

    def _signals(self, s: np.ndarray, cols: dict, idx=None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Calibrated dense scores per signal (for rows ``idx`` or all) and the best token per row."""
        out = {}
        sel = slice(None) if idx is None else idx
        if "text" in cols:
            out["text"] = tsig.calibrate(s[:, cols["text"]][:, 0], self.dim) * self.present["text"][sel]
        if "learned" in cols:
            out["learned"] = tsig.calibrate(np.abs(s[:, cols["learned"]][:, 0]), self.dim) * self.present["learned"][sel]
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
        n = len(self.rows)
        if n == 0:
            return []
        enc = self.encoder.encode_one(prompt)
        text_q = enc.vector.numpy().astype(np.float32) if enc.vector is not None else None
        preview_q = self.preview.encode_text(prompt) if self.preview is not None else None
        return self.search_encoded(prompt, enc, text_q, preview_q, limit=limit, signals=signals, include=include)

    def search_encoded(self, prompt, enc, text_q, preview_q=None, limit=20, signals=None, include=()) -> list[Match]:
        n = len(self.rows)
        q, cols = self._query_matrix(enc, text_q, preview_q)
        k = n if limit is None else min(n, max(limit, 1))
        c = min(n, max(RESCORE, 4 * k))
        product = self._product(q, cols) if c < n and q.shape[1] else None
        lex = lexical.search(self.catalog, prompt, self.rows_by_id, family=self.family)
        lex_all = np.zeros(n, np.float32)
        for fid, (sc, _, bm) in lex.items():
            lex_all[self.by_id[fid]] = sc + 1e-6 * min(bm, 100.0)
        use = set(signals) if signals is not None else None

        def pick(sig: dict) -> dict:
            return {k: v for k, v in sig.items() if use is None or k.lstrip("_").replace("_raw", "") in use}

        if product is not None:
            cand = self._candidates(product, cols, lex_all, use, c)
        elif c < n:  # no dense column: the lexical hits are all there is
            cand = np.argpartition(-lex_all, c - 1)[:c]
        else:
            cand = np.arange(n)
        include = np.asarray(sorted(set(int(i) for i in include)), dtype=np.int64)
        if len(include) and c < n:
            cand = np.union1d(cand, include)
        s_c = self.matrix[cand] @ q if q.shape[1] else np.zeros((len(cand), 0), np.float32)
        sig_c, best_tok = self._signals(s_c, cols, cand)
        sig_c["lexical"] = lex_all[cand]
        fused_c = self._fuse(pick(sig_c), len(cand))
        order = np.argsort(-fused_c, kind="stable")
        top = [int(j) for j in order[:k] if fused_c[j] > 0]
        if len(include):  # the rows asked for, wherever they rank
            shown = set(top)
            top += [int(j) for j in np.flatnonzero(np.isin(cand, include)) if j not in shown]
        out = []
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
                t = int((enc.tokens.numpy() @ self.matrix[i, a : a + w]).argmax())
                m.tokens["text"] = enc.words[t] if t < len(enc.words) else None
            if "learned" in m.signals:
                m.reasons["learned"] = f"learned weight embedding close to the prompt ({m.signals['learned']:.2f})"
            if "preview" in m.signals:
                m.reasons["preview"] = f"preview image matches ({m.signals['preview']:.2f})"
            out.append(m)
        return out

    def _product(self, q: np.ndarray, cols: dict):
        """Stage 1's product over all rows: ``(s [n, >= C], per-block factors for the reduced scores)``."""
        order = sorted(self.blocks, key=lambda b: self.blocks[b][0])
        block_of = {name: order.index("weights" if name.startswith("w") else name) for name in cols}
        post: dict[str, np.ndarray] = {}
        if self.scan.dtype == torch.int8:
            qs = np.zeros(len(order), np.float32)  # one query scale per block (its columns are unit vectors)
            for name, sl in cols.items():
                qs[block_of[name]] = max(qs[block_of[name]], float(np.abs(q[:, sl]).max()) / 127.0)
            qs[qs == 0] = 1.0
            width = -(-q.shape[1] // 8) * 8  # _int_mm wants a multiple of 8 columns
            qi = np.zeros((q.shape[0], width), np.int8)
            for name, sl in cols.items():
                qi[:, sl] = np.rint(q[:, sl] / qs[block_of[name]])
            s = torch._int_mm(self.scan, torch.from_numpy(qi)).numpy()  # int32 [n, width]
            for name in cols:
                key = "weights" if name.startswith("w") else name
                post[key] = self.row_scale[:, block_of[name]] * qs[block_of[name]]
        elif self.scan.dtype == torch.float32:
            s = self.matrix @ q
        else:
            s = torch.mm(self.scan, torch.from_numpy(q).to(self.scan.dtype)).float().numpy()
        return s, post

    def _candidates(self, product, cols: dict, lex_all: np.ndarray, use, c: int) -> np.ndarray:
        """Stage 1: the ``c`` rows with the best fused score on the compact matrix.

        The product runs in torch (its thread setting); the reductions over the ``[n, C]`` result run in
        numpy, single-threaded on purpose: on a small shared machine a multi-threaded elementwise op over
        100K rows waits for a second core's time slice (milliseconds each), more than the op itself."""
        n = len(self.rows)
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
        return select_by_coverage(prompt, self.candidates(prompt, top_k, thresholds), self.vocab, top_k, thresholds)

    def thresholds_for(self, min_score: float | None = None) -> dict:
        self.refresh()
        if min_score is not None:
            return {k: float(min_score) for k in self.thresholds}
        return dict(self.thresholds)

    def candidates(self, prompt: str, top_k: int = DEFAULT_TOP_K, thresholds: dict | None = None) -> list[Match]:
        """The search's best ``max(4 top_k, 20)`` matches, plus every row whose phrase or description word the
        prompt contains (:meth:`Vocabulary.rows_for`: also a plural or prefix the full-text index cannot see;
        with ``thresholds``, a description word too common to reach its threshold is skipped), those rescored
        with the rest. The work grows with these candidates, not with the catalog."""
        self.refresh()
        floor = (thresholds or {}).get("description", 0.0)
        include = [self.by_id[i] for i in self.vocab.rows_for(tokens(prompt), floor) if i in self.by_id]
        return self.search(prompt, limit=max(4 * top_k, 20), include=include)


SCAN_DTYPE = None  # stage 1's compact copy above BF16_ROWS: None = the fastest here (probed), or "int8" / "bfloat16" / "float32"


def _compact(matrix: np.ndarray, blocks: dict, compact: bool):
    """The stage-1 copy of ``matrix``: itself (float32), or int8 with a float32 scale per row and block
    ``[n, blocks]``, blocks in column order, or bfloat16. Which one: :data:`SCAN_DTYPE`, else the fastest on
    a probe of 4,096 rows: int8 matmul is 4x less memory traffic where the CPU has an int8 dot product
    (VNNI), but on a CPU without one ``torch._int_mm`` and bfloat16 run 10x slower than float32."""
    t = torch.from_numpy(matrix)
    if not compact or not len(matrix):
        return t, None
    kind = SCAN_DTYPE or _fastest_scan(matrix, blocks)
    if kind == "int8":
        q8, scale = _int8(matrix, blocks)
        return torch.from_numpy(q8), scale
    if kind == "bfloat16":
        return t.to(torch.bfloat16), None
    return t, None


def _int8(matrix: np.ndarray, blocks: dict) -> tuple[np.ndarray, np.ndarray]:
    spans = sorted(blocks.values())
    n = matrix.shape[0]
    q8 = np.empty(matrix.shape, np.int8)
    scale = np.ones((n, len(spans)), np.float32)
    for b, (a, w) in enumerate(spans):
        blk = matrix[:, a : a + w]
        sc = np.abs(blk).max(1) / 127.0
        sc[sc == 0] = 1.0
        scale[:, b] = sc
        q8[:, a : a + w] = np.rint(blk / sc[:, None])
    return q8, scale


def _fastest_scan(matrix: np.ndarray, blocks: dict, rows: int = 4096, cols: int = 24) -> str:
    """The stage-1 dtype with the fastest ``[rows, D] @ [D, cols]`` product on this machine (best of 3)."""
    import time

    sample = np.ascontiguousarray(matrix[:rows])
    q = np.random.default_rng(0).standard_normal((matrix.shape[1], cols)).astype(np.float32)
    runs = {"float32": lambda: sample @ q}
    try:
        s8 = torch.from_numpy(_int8(sample, blocks)[0])
        q8 = torch.from_numpy(np.rint(np.clip(q * 40, -127, 127)).astype(np.int8))
        torch._int_mm(s8[:32], q8)  # supported here?
        runs["int8"] = lambda: torch._int_mm(s8, q8)
    except Exception:  # noqa: BLE001 - no int8 matmul on this build
        sb, qb = torch.from_numpy(sample).to(torch.bfloat16), torch.from_numpy(q).to(torch.bfloat16)
        runs["bfloat16"] = lambda: torch.mm(sb, qb)
    best = {}
    for name, run in runs.items():
        run()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return min(best, key=best.get)


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
