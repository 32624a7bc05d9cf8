"""Per-kind selection thresholds, fitted on a labelled prompt set and stored with the catalog.

Each claim kind (trigger, name, description, text, weights) has its own score scale, so each has its own
floor. :func:`fit` chooses them by coordinate search over :data:`GRID` on a *tuning* set: the best mean of
precision and recall on prompts naming concepts, subject to a false-positive rate of at most
``max_base_fp`` on base-only prompts (nothing to pick); of tied floors, the middle one (the widest margin).
:func:`curves` gives each kind's precision/recall/false-positive curve with the others at their fit.
:func:`store` writes the result to the catalog's ``meta`` table (per text encoder), where
:class:`~lora_composer.retriever.search.Retriever` reads it; without one it uses
:data:`DEFAULT_THRESHOLDS` (the fit on the mini world's tuning set, ``python -m bench.retrieval``).
"""

from __future__ import annotations

import json

from lora_composer.retriever.selection import all_claims, choose

KINDS = ("trigger", "name", "description", "text", "weights")
GRID = tuple(round(0.05 * i, 2) for i in range(2, 21)) + (1.01,)  # 1.01: the kind never selects
DEFAULT_THRESHOLDS = {"trigger": 0.55, "name": 0.6, "description": 0.35, "text": 0.95, "weights": 0.7}


def measure(retriever, cached, label_of, thresholds: dict, top_k: int) -> dict:
    """Precision, recall (named prompts) and false-positive rate (base-only prompts) of one threshold set.

    ``cached``: :func:`prepare`'s ``[(prompt, wanted labels, claims)]``; ``label_of(row)``: the row's concept label or
    None (a pick whose label is not wanted, or a second pick of one label, is a false positive)."""
    tp = fp = fn = base = base_hit = 0
    for prompt, wanted, claims in cached:
        picks = choose(*claims, retriever.vocab, top_k, thresholds)
        got = [label_of(m.row) for m in picks]
        if not wanted:
            base += 1
            base_hit += bool(picks)
        hit = set(got) & set(wanted)
        tp += len(hit)
        fp += len(got) - len(hit)
        fn += len(set(wanted) - hit)
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "fp_rate": base_hit / base if base else 0.0,
        "picks": tp + fp,
    }


def prepare(retriever, cases, top_k: int) -> list:
    """``[(prompt, wanted, claims)]`` for :func:`measure`: each prompt searched and its claims found once."""
    return [(p, w, all_claims(p, retriever.candidates(p, top_k), retriever.vocab)) for p, w in cases]


def fit(
    retriever, cases, label_of, top_k: int, max_base_fp: float = 0.01, rounds: int = 3, prepared: bool = False
) -> dict:
    """Thresholds for ``cases`` (``[(prompt, wanted labels)]``, or :func:`prepare`'s output with
    ``prepared``); see the module doc."""
    cached = cases if prepared else prepare(retriever, cases, top_k)
    th = dict(DEFAULT_THRESHOLDS)

    def objective(t):
        r = measure(retriever, cached, label_of, t, top_k)
        ok = r["fp_rate"] <= max_base_fp
        return (ok, (r["precision"] + r["recall"]) / 2 if ok else -r["fp_rate"])

    for _ in range(rounds):
        for kind in KINDS:
            scores = {v: objective({**th, kind: v}) for v in GRID}
            tied = [v for v in GRID if scores[v] == max(scores.values())]
            th[kind] = tied[len(tied) // 2]
    return th


def curves(retriever, cases, label_of, thresholds: dict, top_k: int, prepared: bool = False) -> dict:
    """``{kind: [{threshold, precision, recall, fp_rate}]}`` with the other kinds at ``thresholds``."""
    cached = cases if prepared else prepare(retriever, cases, top_k)
    return {
        kind: [{"threshold": v, **measure(retriever, cached, label_of, {**thresholds, kind: v}, top_k)} for v in GRID]
        for kind in KINDS
    }


def store(catalog, encoder_id: str, thresholds: dict, info: dict | None = None) -> None:
    catalog.set_meta(f"calibration:{encoder_id}", json.dumps({"thresholds": thresholds, **(info or {})}))
    catalog.db.commit()


def load(catalog, encoder_id: str) -> dict | None:
    raw = catalog.get_meta(f"calibration:{encoder_id}")
    if not raw:
        return None
    th = json.loads(raw).get("thresholds", {})
    return {k: float(th.get(k, DEFAULT_THRESHOLDS[k])) for k in KINDS}
