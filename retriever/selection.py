"""``--loras auto``'s choice: adapters by prompt coverage, not by score rank.

A wrong LoRA damages a picture more than a missing one, so an adapter is picked only for a span of the
prompt that names it and that no better pick already covers:

1. claims: each candidate's phrases found in the prompt (:mod:`.phrases`: trigger words, file name,
   description words) and its dense signals (text, weights; their span is the prompt word they respond to
   most), each kept if it reaches its kind's threshold (:mod:`.calibration`);
2. best claim first (score, then the longer span): a claim is left out when its span overlaps a pick's, when
   it duplicates a pick (same trigger words or content), or when it shares a pick's category (``background``,
   ``style``, ...) unless the prompt names both by trigger or name on their own spans;
3. ``top_k`` caps the picks; what the cap drops is reported (:attr:`Selection.notice`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_composer.retriever.phrases import Claim, Vocabulary, tokens

NAMED = ("trigger", "name")


@dataclass
class LeftOut:
    match: object  # search.Match
    why: str  # below threshold | overlapping | duplicate | exclusive | over the cap


class Selection(list):
    """The picks (a list of ``Match``), with ``left_out`` (``[LeftOut]``) and ``dropped`` (over the cap)."""

    def __init__(self, picks=(), left_out=(), dropped=(), top_k: int = 0):
        super().__init__(picks)
        self.left_out = list(left_out)
        self.dropped = list(dropped)
        self.top_k = top_k

    @property
    def notice(self) -> str | None:
        if not self.dropped:
            return None
        spans = ", ".join(f'{m.name} ("{m.span}")' for m in self.dropped)
        return f"--loras auto: the cap of {self.top_k} LoRA(s) left out {spans}; raise --top-k to use them"


def _dense_claims(m, prompt: list[tuple[str, str]], thresholds: dict) -> list[Claim]:
    out = []
    for kind in ("weights", "text"):
        s = m.signals.get(kind, 0.0)
        word = m.tokens.get(kind)
        if s <= 0 or s < thresholds.get(kind, 0.0) or word is None:
            continue
        w = re.sub(r"[^0-9a-z\u00c0-\uffff]", "", word.lower().replace("</w>", ""))
        i = next((j for j, (sw, _) in enumerate(prompt) if w and (sw.lower() == w or sw.lower().startswith(w))), None)
        if i is not None:
            out.append(Claim(i, i + 1, s, kind, f'{kind} respond to "{prompt[i][0]}" ({s:.2f})'))
    return out


def all_claims(prompt: str, matches: list, vocab: Vocabulary) -> tuple[list, list]:
    """``(prompt words, [(match, every claim at any score)])``: what :func:`choose` filters (calibration
    reuses it for every threshold set)."""
    words = tokens(prompt)
    return words, [(m, vocab.claims(m.row.id, words) + _dense_claims(m, words, {})) for m in matches]


def select(prompt: str, matches: list, vocab: Vocabulary, top_k: int, thresholds: dict) -> Selection:
    """See the module doc. ``matches``: the search's candidates (``Match``); ``thresholds``: kind -> floor."""
    return choose(*all_claims(prompt, matches, vocab), vocab, top_k, thresholds)


def choose(words: list, claims_of: list, vocab: Vocabulary, top_k: int, thresholds: dict) -> Selection:
    claimed = []  # (claim, match)
    left = []
    for m, claims in claims_of:
        m.claim = m.span = None
        claims = [c for c in claims if c.score >= thresholds.get(c.kind, 1.01)]
        if not claims:
            left.append(LeftOut(m, "below threshold: " + (m.reason if m.signals else "no signal")))
            continue
        best = max(claims, key=lambda c: (c.score, c.end - c.start, m.score))
        claimed.append((best, m))
    claimed.sort(key=lambda cm: (-cm[0].score, cm[0].start - cm[0].end, -cm[1].score))
    chosen: list = []
    for c, m in claimed:
        why = _conflict(c, m, chosen, vocab)
        if why:
            left.append(LeftOut(m, why))
            continue
        m.claim = c
        m.span = " ".join(w for w, _ in words[c.start : c.end])
        chosen.append((c, m))
    picks = [m for _, m in chosen]
    return Selection(picks[:top_k], left, picks[top_k:], top_k)


def _conflict(c: Claim, m, chosen: list, vocab: Vocabulary) -> str | None:
    for c2, m2 in chosen:
        if _dup_key(m.row) == _dup_key(m2.row):
            return f"duplicate of {m2.name} (same trigger words or content)"
        if c.overlaps(c2):
            return f'overlapping: "{m2.span}" is covered by {m2.name}'
        shared = vocab.category.get(m.row.id, frozenset()) & vocab.category.get(m2.row.id, frozenset())
        if shared and not (c.kind in NAMED and c2.kind in NAMED):
            return f"exclusive with {m2.name} (both {'/'.join(sorted(shared))}; the prompt names only one)"
    return None


def _dup_key(row) -> str:
    cached = getattr(row, "__dict__", {}).get("_dup_key")
    if cached is not None:
        return cached
    key = _dup_key_of(row)
    if hasattr(row, "__dict__"):
        row.__dict__["_dup_key"] = key
    return key


def _dup_key_of(row) -> str:
    words = sorted({w.strip().lower() for w in row.trigger_words if w.strip()})
    return "trigger:" + "|".join(words) if words else "sha:" + row.sha256
