"""Per-kind selection thresholds, fitted on a labelled prompt set and stored with the catalog.

Each claim kind (trigger, name, description, text, weights) has its own score scale, so each has its own
floor. :func:`fit` chooses them by coordinate search over :data:`GRID` on a *tuning* set: the best mean of
precision and recall on prompts naming concepts, subject to a false-positive rate of at most
``max_base_fp`` on base-only prompts (nothing to pick); ties go to the higher (more cautious) floor.
:func:`curves` gives each kind's precision/recall/false-positive curve with the others at their fit.
:func:`store` writes the result to the catalog's ``meta`` table (per text encoder), where
:class:`~lora_composer.retriever.search.Retriever` reads it; without one it uses
:data:`DEFAULT_THRESHOLDS` (the fit on the mini world's tuning set, ``python -m bench.retrieval``).
"""

from __future__ import annotations

import json

from lora_composer.retriever.selection import select

KINDS = ("trigger", "name", "description", "text", "weights")
GRID = tuple(round(0.05 * i, 2) for i in range(2, 21)) + (1.01,)  # 1.01: the kind never selects
DEFAULT_THRESHOLDS = {"trigger": 0.5, "name": 0.5, "description": 0.5, "text": 1.01, "weights": 0.3}


def measure(retriever, cached, label_of, thresholds: dict, top_k: int) -> dict:
    """Precision, recall (named prompts) and false-positive rate (base-only prompts) of one threshold set.

    ``cached``: ``[(prompt, wanted labels, candidates)]``; ``label_of(row)``: the row's concept label or
    None (a pick whose label is not wanted, or a second pick of one label, is a false positive)."""
    tp = fp = fn = base = base_hit = 0
    for prompt, wanted, cands in cached:
        picks = select(prompt, cands, retriever.vocab, top_k, thresholds)
        got = [label_of(m.row) for m in picks]
        if not wanted:
            base += 1
            base_hit += bool(picks)
        hit = set(got) & set(wanted)
        tp += len(hit)
        fp += len(got) - len(hit)
        fn += len(set(wanted) - hit)
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "fp_rate": base_hit / base if base else 0.0, "picks": tp + fp}


def fit(retriever, cases, label_of, top_k: int, max_base_fp: float = 0.01, rounds: int = 3) -> dict:
    """Thresholds for ``cases`` (``[(prompt, wanted labels)]``); see the module doc."""
    cached = [(p, w, retriever.candidates(p, top_k)) for p, w in cases]
    th = dict(DEFAULT_THRESHOLDS)

    def objective(t):
        r = measure(retriever, cached, label_of, t, top_k)
        ok = r["fp_rate"] <= max_base_fp
        return (ok, (r["precision"] + r["recall"]) / 2 if ok else -r["fp_rate"])

    for _ in range(rounds):
        for kind in KINDS:
            best = max(GRID, key=lambda v: (objective({**th, kind: v}), v))
            th[kind] = best
    return th


def curves(retriever, cases, label_of, thresholds: dict, top_k: int) -> dict:
    """``{kind: [{threshold, precision, recall, fp_rate}]}`` with the other kinds at ``thresholds``."""
    cached = [(p, w, retriever.candidates(p, top_k)) for p, w in cases]
    return {kind: [{"threshold": v, **measure(retriever, cached, label_of, {**thresholds, kind: v}, top_k)}
                   for v in GRID] for kind in KINDS}


def store(catalog, encoder_id: str, thresholds: dict, info: dict | None = None) -> None:
    catalog.set_meta(f"calibration:{encoder_id}", json.dumps({"thresholds": thresholds, **(info or {})}))
    catalog.db.commit()


def load(catalog, encoder_id: str) -> dict | None:
    raw = catalog.get_meta(f"calibration:{encoder_id}")
    if not raw:
        return None
    th = json.loads(raw).get("thresholds", {})
    return {k: float(th.get(k, DEFAULT_THRESHOLDS[k])) for k in KINDS}
