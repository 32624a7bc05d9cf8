"""Lexical signal: the prompt's words against names, trigger words, tags and descriptions (FTS5/BM25).

FTS5 (``bm25`` with column weights name 2, trigger words 4, tags 1, description 0.5) finds and orders the
candidates; the score in [0, 1] says what matched, so it means the same in any library size:

- a trigger word (phrase) found whole in the prompt: 1; partly: 0.8 x the share of its words found;
- the file name's words: 0.8 x the share found in the prompt;
- tags and description: 0.5 x the share of the prompt's content words they contain.

Ties are broken by BM25.
"""

from __future__ import annotations

import re

STOPWORDS = frozenset(
    "a an the of and or in on at to with by for from as is are be this that it its into over under very "
    "photo picture image style art".split()
)
_WORD = re.compile(r"[0-9A-Za-z\u00C0-\uFFFF]+")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def content_words(text: str) -> list[str]:
    return [w for w in dict.fromkeys(words(text)) if w not in STOPWORDS and len(w) > 1]


def _contains(seq: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return n > 0 and any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def _row_words(row):
    """The row's trigger-word, name and tag/description words, tokenised once per row object."""
    cached = row.__dict__.get("_lex_words")
    if cached is None:
        trig = [(t, words(t)) for t in row.trigger_words]
        name = [w for w in words(re.sub(r"[_\-.]", " ", row.name)) if w not in STOPWORDS and not w.isdigit()]
        other = set(words(" ".join(row.tags))) | set(words(row.description))
        cached = row.__dict__["_lex_words"] = (trig, name, other)
    return cached


def score_row(prompt_words: list[str], prompt_content: set[str], row) -> tuple[float, str]:
    """``(score, reason)`` for one catalog row."""
    best, why = 0.0, ""
    trigs, name_words, other = _row_words(row)
    for trig, tw in trigs:
        if not tw:
            continue
        if _contains(prompt_words, tw):
            return 1.0, f'trigger "{trig}" in prompt'
        found = [w for w in tw if w in prompt_content]
        s = 0.8 * len(found) / len(tw)
        if s > best:
            best, why = s, f'trigger "{trig}" partly ({", ".join(found)})'
    if name_words:
        found = [w for w in name_words if w in prompt_content]
        s = 0.8 * len(found) / len(name_words)
        if s > best:
            best, why = s, f'name "{row.name}" ({", ".join(found)})'
    if prompt_content:
        found = [w for w in prompt_content if w in other]
        s = 0.5 * len(found) / len(prompt_content)
        if s > best:
            best, why = s, f"tags/description mention {', '.join(found)}"
    return best, why


def search(catalog, prompt: str, rows_by_id: dict, family: str | None = None, limit: int = 500, common=None):
    """``{file id: (score, reason, bm25)}`` for the rows FTS5 finds for ``prompt``.

    ``common`` (rows read on demand only, a vector-indexed catalog): a prompt word more than ``common`` rows
    contain is left out of the FTS5 query (:meth:`Catalog.fts_common`); a row the other words find is still
    scored against it. See ``search.COMMON_WORD_ROWS`` for why."""
    pw = words(prompt)
    pc = content_words(prompt)
    out = {}
    if hasattr(rows_by_id, "prefetch"):  # rows read on demand (a vector-indexed catalog): the words come with
        return _search_light(catalog, pw, pc, family, limit, rows_by_id, common)  # the hits, never whole rows
    hits = catalog.fts_search(pc, family=family, limit=limit)
    for fid, bm25 in hits:
        row = rows_by_id.get(fid)
        if row is None:
            continue
        s, why = score_row(pw, set(pc), row)
        if s > 0:
            out[fid] = (s, why, bm25)
    return out


class _Words:
    """What :func:`score_row` reads of a row."""

    def __init__(self, name, trigger_words, tags, description):
        self.name, self.trigger_words, self.tags, self.description = name, trigger_words, tags, description


def _search_light(catalog, pw, pc, family, limit, cache, common=None) -> dict:
    """:func:`search` on the hits' words (one FTS5 query for the hits, one read of the words of those hits not
    seen before), each hit's tokenised words kept in ``cache.lex_words`` (bounded) for the next query; the
    words more than ``common`` rows contain are scored but not matched."""
    import json

    memo = cache.__dict__.setdefault("lex_words", {})
    if len(memo) > 200_000:
        memo.clear()
    skip = catalog.fts_common(pc, common) if common is not None and pc else set()
    hits = catalog.fts_search([w for w in pc if w not in skip], family=family, limit=limit)
    todo = [fid for fid, _ in hits if fid not in memo]
    if todo:
        for fid, name, trig, tags, desc in catalog.words_by_ids(todo):
            memo[fid] = (name, _row_words(_Words(name, json.loads(trig), json.loads(tags), desc)))
    out = {}
    content = set(pc)
    for fid, bm25 in hits:
        got = memo.get(fid)
        if got is None:  # no longer in the catalog
            continue
        row = _Words(got[0], None, None, None)
        row.__dict__["_lex_words"] = got[1]
        s, why = score_row(pw, content, row)
        if s > 0:
            out[fid] = (s, why, bm25)
    return out
