"""Prompt spans and adapter phrases: what part of the prompt an adapter's words account for.

Selection by coverage needs to know *where* in the prompt an adapter is named, and a phrase must match as a
phrase: ``"checkered background"`` is named by ``checkered background``, ``background, checkered`` or
``checkerboard backdrop`` (via its description), never by ``background`` alone. Words are compared after a
light normalisation (lower case, a few generic spelling variants and plural/participle endings), and a
prompt word may extend a phrase word of five or more letters (``pixel`` -> ``pixelated``).

:class:`Vocabulary` reads the whole library once: a word is *generic* when several adapters' phrases use it
with different other words (``background`` in ``checkered background`` and ``wavy background``; ``shape``
in ``star-shape`` and ``cross-shape``). A phrase needs all its non-generic words; its generic words alone
never match, and adapters that share a generic head word form a *category* (mutually exclusive picks).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

_WORD = re.compile(r"[0-9A-Za-z\u00C0-\uFFFF]+")
FUNCTION = frozenset(
    "a an the of and or in on at to with by for from as is are be this that it its into over under very "
    "any all some each one two three who which made look looks like using inside image picture photo lora "
    "version model trained".split()
)
# Generic spelling variants of prompt vocabulary (not concept names): compared after this map.
VARIANTS = {
    "color": "colour",
    "colored": "colour",
    "coloured": "colour",
    "backdrop": "background",
    "bg": "background",
    "grey": "gray",
    "shaped": "shape",
    "chequered": "checkered",
    "centre": "center",
}
_NAME_SEP = re.compile(r"[_\-.]")
NAME_NOISE = re.compile(r"^(v\d+|\d+|lora|locon|lycoris|loha|final|fp16|safetensors)$")
KIND_WEIGHT = {"trigger": 1.0, "name": 0.9, "description": 0.6}


@lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """``backgrounds`` -> ``background``, ``outlined``/``outlines``/``outline`` -> ``outlin``."""
    w = VARIANTS.get(word, word)
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 4 and w.endswith("es") and w[-3] in "sxz":
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    if len(w) > 5 and w.endswith("ed"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("e"):
        w = w[:-1]
    return VARIANTS.get(w, w)


@lru_cache(maxsize=1 << 16)
def _word(surface: str) -> tuple[str, bool]:
    """``(stem, is a content word)`` of one surface word (cached: a library repeats its words)."""
    low = surface.lower()
    s = stem(low)
    return s, low not in FUNCTION and len(s) > 1


def tokens(text: str) -> list[tuple[str, str]]:
    """``[(surface word, stem)]`` of ``text``, in order (function words kept: they only fill spans)."""
    return [(w, _word(w)[0]) for w in _WORD.findall(text or "")]


def content(text: str) -> list[str]:
    """Stems of ``text``'s content words, in order, without repeats."""
    out = {}
    for w in _WORD.findall(text or ""):
        s, keep = _word(w)
        if keep:
            out[s] = None
    return list(out)


def _eq(phrase_word: str, prompt_word: str) -> float:
    """1 for the same stem, 0.9 when the prompt word extends a phrase word of 5+ letters, else 0."""
    if phrase_word == prompt_word:
        return 1.0
    return 0.9 if len(phrase_word) >= 5 and prompt_word.startswith(phrase_word) else 0.0


@dataclass
class Claim:
    """An adapter's claim on the prompt: word positions ``[start, end)``, a score in [0, 1] and its source."""

    start: int
    end: int
    score: float
    kind: str  # trigger | name | description | text | weights
    evidence: str

    def overlaps(self, other: "Claim") -> bool:
        return self.start < other.end and other.start < self.end


class Vocabulary:
    """Per-row phrases (trigger words, file name, description words) and the library's generic words.

    Built in one pass over the rows' words (stems cached); a row's description words and their weights are
    worked out when a query first needs that row (:meth:`claims`). :meth:`rows_for` is the phrase index: the
    rows whose phrases or description words a prompt contains, so a query checks only those rows."""

    def __init__(self, rows):
        self.phrases: dict[int, list[tuple[str, list[str], str]]] = {}
        self._desc: dict[int, list[str]] = {}  # row id -> description content stems
        contexts: dict[str, set] = {}
        self._desc_df: dict[str, int] = {}
        count, max_id = 0, -1
        for r in rows:
            count, max_id = count + 1, max(max_id, r.id)
            ph, desc = row_words(r)
            self.phrases[r.id] = ph
            for _, words, _ in ph:
                fw = frozenset(words)
                for w in words:
                    contexts.setdefault(w, set()).add(fw - {w})
            self._desc[r.id] = desc
            for w in desc:
                self._desc_df[w] = self._desc_df.get(w, 0) + 1
        self._contexts = contexts
        self.generic = {w for w, ctx in contexts.items() if len([c for c in ctx if c]) >= 2}
        self._named = set(contexts)
        self._n = max(count, 1)
        self._count, self._max_id = count, max_id
        self._desc_words: dict[int, dict[str, float]] = {}
        self.category = {}
        self._index: dict[str, list[int]] = {}  # stem -> rows whose phrase needs it
        self._desc_index: dict[str, list[int]] = {}  # stem -> rows whose description has it
        for rid, ph in self.phrases.items():
            own = {w for _, words, _ in ph for w in words}
            self.category[rid] = frozenset(w for w in own if w in self.generic)
            for w in self._needs(ph):
                self._index.setdefault(w, []).append(rid)
            for w in self._desc[rid]:
                if w not in self._named:
                    self._desc_index.setdefault(w, []).append(rid)

    def _needs(self, ph) -> set[str]:
        """The words under which the phrase index lists a row: each phrase's non-generic words (all its words
        when every one is generic)."""
        return {w for _, words, _ in ph for w in ([x for x in words if x not in self.generic] or words)}

    # -- large catalogs: stored compact, per-row parts read from the catalog on demand ---------------
    @classmethod
    def compact_from(cls, rows) -> "Vocabulary":
        """What ``Vocabulary(rows()).compact()`` gives, built in two streaming passes over ``rows()`` (a
        callable returning an iterable): no per-row maps are held, so a million rows fit in little memory."""
        from array import array

        import numpy as np

        self = cls.__new__(cls)
        contexts: dict[str, set] = {}
        df: dict[str, int] = {}
        count, max_id = 0, -1
        for r in rows():
            count, max_id = count + 1, max(max_id, r.id)
            ph, desc = row_words(r)
            for _, words, _ in ph:
                fw = frozenset(words)
                for w in words:
                    contexts.setdefault(w, set()).add(fw - {w})
            for w in desc:
                df[w] = df.get(w, 0) + 1
        self._contexts, self._desc_df = contexts, df
        self.generic = {w for w, ctx in contexts.items() if len([c for c in ctx if c]) >= 2}
        self._named = set(contexts)
        self._n, self._count, self._max_id = max(count, 1), count, max_id
        index: dict[str, array] = {}
        desc_index: dict[str, array] = {}
        for r in rows():
            ph, desc = row_words(r)
            for w in self._needs(ph):
                index.setdefault(w, array("q")).append(r.id)
            for w in desc:
                if w not in self._named:
                    desc_index.setdefault(w, array("q")).append(r.id)
        self._index = {w: np.frombuffer(a, np.int64).copy() for w, a in index.items()}
        self._desc_index = {w: np.frombuffer(a, np.int64).copy() for w, a in desc_index.items()}
        self.phrases = self._desc = self.category = None
        self._desc_words = {}
        return self

    def compact(self) -> "Vocabulary":
        """Drop the per-row maps (a million rows' phrases) and keep the word indexes as arrays: what is stored
        beside a vector-indexed catalog. :meth:`attach` gives it the rows to read per-row parts from."""
        import numpy as np

        self.phrases = self._desc = self.category = None
        self._index = {w: np.asarray(v, np.int64) for w, v in self._index.items()}
        self._desc_index = {w: np.asarray(v, np.int64) for w, v in self._desc_index.items()}
        self._desc_words = {}
        return self

    def save(self, path, version: str) -> None:
        """Store a compact vocabulary as ``path`` (``.npz``: the word indexes as id arrays, the rest as JSON;
        nothing a load would execute, unlike a pickle in a folder others may hand around)."""
        import json

        import numpy as np

        def packed(index):
            words = sorted(index)
            ids = [np.asarray(index[w], np.int64) for w in words]
            offsets = np.cumsum([0, *(len(a) for a in ids)]).astype(np.int64)
            return words, (np.concatenate(ids) if ids else np.zeros(0, np.int64)), offsets

        index_words, index_ids, index_offsets = packed(self._index)
        desc_words, desc_ids, desc_offsets = packed(self._desc_index)
        meta = {
            "version": version,
            "n": self._n,
            "count": self._count,
            "max_id": self._max_id,
            "contexts": {w: sorted(sorted(c) for c in ctx) for w, ctx in self._contexts.items()},
            "desc_df": self._desc_df,
            "index_words": index_words,
            "desc_words": desc_words,
        }
        with open(path, "wb") as fh:
            np.savez(
                fh,
                meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                index_ids=index_ids,
                index_offsets=index_offsets,
                desc_ids=desc_ids,
                desc_offsets=desc_offsets,
            )

    @classmethod
    def load(cls, path) -> tuple[str, "Vocabulary"]:
        """``(catalog version, compact vocabulary)`` from :meth:`save`'s file (no pickles are read)."""
        import json

        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes())
            arrays = {k: data[k] for k in ("index_ids", "index_offsets", "desc_ids", "desc_offsets")}

        def unpacked(words, ids, offsets):
            return {w: ids[offsets[i] : offsets[i + 1]].copy() for i, w in enumerate(words)}

        self = cls.__new__(cls)
        self._contexts = {w: {frozenset(c) for c in ctx} for w, ctx in meta["contexts"].items()}
        self._desc_df = meta["desc_df"]
        self.generic = {w for w, ctx in self._contexts.items() if len([c for c in ctx if c]) >= 2}
        self._named = set(self._contexts)
        self._n, self._count, self._max_id = meta["n"], meta["count"], meta["max_id"]
        self._index = unpacked(meta["index_words"], arrays["index_ids"], arrays["index_offsets"])
        self._desc_index = unpacked(meta["desc_words"], arrays["desc_ids"], arrays["desc_offsets"])
        self.phrases = self._desc = self.category = None
        self._desc_words = {}
        return meta["version"], self

    def attach(self, rows) -> "Vocabulary":
        """``rows``: ``{id: row}``-like (``.get``), where a compact vocabulary reads a row's words."""
        self._rows = rows
        self._memo: dict = {}
        self.phrases, self._desc, self.category = _PerRow(self, 0), _PerRow(self, 1), _PerRow(self, 2)
        return self

    def add_rows(self, rows) -> bool:
        """Add new rows (ids above every known one) to a compact vocabulary in time proportional to them.
        False when they would turn a word generic (a rebuild is cheaper to get right than an edit of every
        row that uses it); the caller then rebuilds."""
        import numpy as np

        rows = list(rows)
        news: dict[str, list] = {}
        desc_new: dict[str, list] = {}
        for r in rows:
            ph, desc = row_words(r)
            for _, words, _ in ph:
                fw = frozenset(words)
                for w in words:
                    ctx = self._contexts.setdefault(w, set())
                    ctx.add(fw - {w})
                    if w not in self.generic and len([c for c in ctx if c]) >= 2:
                        return False
                    if w not in self._named:  # a description word that is now a phrase word: never a desc claim
                        self._named.add(w)
                        self._desc_index.pop(w, None)
            for w in self._needs(ph):
                news.setdefault(w, []).append(r.id)
            for w in desc:
                self._desc_df[w] = self._desc_df.get(w, 0) + 1
                if w not in self._named:
                    desc_new.setdefault(w, []).append(r.id)
            self._count += 1
            self._max_id = max(self._max_id, r.id)
        for index, new in ((self._index, news), (self._desc_index, desc_new)):
            for w, ids in new.items():
                index[w] = np.concatenate([np.asarray(index.get(w, ()), np.int64), np.asarray(ids, np.int64)])
        self._n = max(self._count, 1)
        self._desc_words = {}  # idf moved with n and df
        return True

    def idf(self, word: str) -> float:
        """A description word's weight in [0, 1]: ``log(1 + n / df) / log(1 + n)`` (1: one row has it)."""
        return math.log(1 + self._n / self._desc_df[word]) / math.log(1 + self._n)

    def desc_words(self, row_id: int) -> dict[str, float]:
        """The row's description words that may claim a prompt word, with their weight (:meth:`idf`)."""
        got = self._desc_words.get(row_id)
        if got is None:
            own = {w for _, words, _ in self.phrases.get(row_id, []) for w in words}
            got = {
                w: self.idf(w)
                for w in self._desc.get(row_id, [])
                if w not in self.generic and w not in own and w not in self._named
            }
            self._desc_words[row_id] = got
        return got

    def rows_for(self, prompt: list[tuple[str, str]], desc_floor: float = 0.0) -> set[int]:
        """Ids of the rows that may have a claim on ``prompt`` (``tokens(prompt)``): a phrase word, or a
        description word whose claim can reach ``desc_floor`` (the description threshold), equal to a prompt
        stem or (5+ letters) a prefix of one. A word common enough to fall below the floor is skipped, so the
        work is the prompt's words and the rows that can claim them: at most ``n^0.42`` rows per description
        word at the 0.35 floor (121 of 100,000), not the catalog."""
        out: set[int] = set()
        for rows in self.rows_by_word(prompt, desc_floor).values():
            out.update(rows)
        return out

    def rows_by_word(self, prompt: list[tuple[str, str]], desc_floor: float = 0.0) -> dict:
        """:meth:`rows_for`, per word (a prompt stem or prefix, ``"desc:"`` before a description word)."""
        out = {}
        for _, s in prompt:
            for key in [s] + [s[:i] for i in range(5, len(s))]:
                rows = self._index.get(key)
                if rows is not None and len(rows):
                    out[key] = rows
                rows = self._desc_index.get(key)
                if rows is not None and len(rows) and KIND_WEIGHT["description"] * self.idf(key) >= desc_floor:
                    out["desc:" + key] = rows
        return out

    def claims(self, row_id: int, prompt: list[tuple[str, str]]) -> list[Claim]:
        """Every phrase of the row found in the prompt (``tokens(prompt)``), best first."""
        stems = [s for _, s in prompt]
        out = []
        for kind, words, text in self.phrases.get(row_id, []):
            found = _match(words, self.generic, stems)
            if found is not None:
                start, end, score = found
                out.append(Claim(start, end, KIND_WEIGHT[kind] * score, kind, f'{kind} "{text}"'))
        desc = self.desc_words(row_id)
        if desc:
            first: dict[str, tuple[int, float]] = {}  # description word -> its first prompt position
            for i, s in enumerate(stems):
                for key in (s, *(s[:j] for j in range(5, len(s)))):
                    if key in desc and key not in first:
                        first[key] = (i, _eq(key, s))
            for w in desc:
                if w in first:
                    i, q = first[w]
                    out.append(
                        Claim(
                            i,
                            i + 1,
                            KIND_WEIGHT["description"] * desc[w] * q,
                            "description",
                            f'description word "{prompt[i][0]}"',
                        )
                    )
        out.sort(key=lambda c: (-c.score, c.start - c.end))
        return out


def row_words(r) -> tuple[list, list[str]]:
    """A row's phrases ``[(kind, stems, text)]`` (trigger words, file name) and description stems."""
    ph = []
    for t in r.trigger_words:
        c = content(t)
        if c:
            ph.append(("trigger", c, t))
    name = [s for w, s in tokens(_NAME_SEP.sub(" ", r.name)) if not NAME_NOISE.match(w.lower())]
    if name:
        ph.append(("name", list(dict.fromkeys(name)), r.name))
    return ph, content(r.description)


class _PerRow:
    """One per-row map of a compact :class:`Vocabulary` (0: phrases, 1: description stems, 2: category),
    worked out from the catalog row when asked."""

    def __init__(self, vocab, part: int):
        self.vocab, self.part = vocab, part

    def get(self, rid, default=None):
        rid = int(rid)
        memo = self.vocab._memo  # shared by the three maps; bounded
        got = memo.get(rid)
        if got is None:
            row = self.vocab._rows.get(rid)
            if row is None:
                return default
            if len(memo) > 100_000:
                memo.clear()
            got = memo[rid] = row_words(row)
        ph, desc = got
        if self.part == 0:
            return ph
        if self.part == 1:
            return desc
        return frozenset(w for _, words, _ in ph for w in words if w in self.vocab.generic)

    def __getitem__(self, rid):
        got = self.get(rid)
        if got is None:
            raise KeyError(rid)
        return got


def _match(words: list[str], generic: set, stems: list[str]) -> tuple[int, int, float] | None:
    """``(start, end, score)`` of ``words`` in ``stems``: every non-generic word (or every word, when all are
    generic) within a window of ``len(words) + 3``; 1 for the phrase in order, 0.95 for all its words in
    any order, 0.9 for its non-generic words only; x0.9 if a word matched only as a prefix."""
    need = [w for w in words if w not in generic] or list(words)
    window = len(words) + 3
    best = None
    for anchor, s in enumerate(stems):
        if not _eq(need[0], s):
            continue
        lo, hi = max(0, anchor - window), min(len(stems), anchor + window + 1)
        pos, quality = {}, 1.0
        for w in words:
            hits = [(abs(i - anchor), i, _eq(w, stems[i])) for i in range(lo, hi) if _eq(w, stems[i])]
            if hits:
                _, i, q = min(hits)
                pos[w], quality = i, min(quality, q)
        if any(w not in pos for w in need):
            continue
        idx = sorted(pos.values())
        if idx[-1] - idx[0] >= window:
            continue
        if len(pos) == len(words):
            in_order = [pos[w] for w in words] == list(range(idx[0], idx[0] + len(words)))
            score = 1.0 if in_order else 0.95
        else:
            score = 0.9
        cand = (idx[0], idx[-1] + 1, score * quality)
        if best is None or cand[2] > best[2]:
            best = cand
    return best


RESAVE_SHARE = 0.05  # rows added since the stored vocabulary was written, as a share of it, before it is rewritten


def stored_vocabulary(catalog, family: str | None, folder, rows, held: Vocabulary | None = None) -> Vocabulary:
    """The compact vocabulary of a large catalog (``rows``: where it reads per-row words), from
    ``folder/vocabulary.npz`` (:meth:`Vocabulary.save`): as stored when the catalog has not changed, brought up
    to date when rows were only added (:meth:`Vocabulary.add_rows`; the file is rewritten only once they exceed
    :data:`RESAVE_SHARE` of it, so adding a thousand rows to a million writes nothing here), else built again
    from the rows' words and stored."""
    from pathlib import Path

    path = Path(folder) / "vocabulary.npz"
    version = catalog.version()
    vocab = None
    if held is not None and getattr(held, "_stored", None) is not None:  # this process's copy: no file read
        vocab, stored_version = held, None
        held._stored = None  # extended in place below (or dropped): a failed extension leaves it unusable
    elif path.is_file():
        try:
            stored_version, vocab = Vocabulary.load(path)
        except Exception:  # noqa: BLE001 - a broken file is rebuilt
            vocab = None
    if vocab is not None and stored_version == version:
        vocab._stored = path
        return vocab.attach(rows)
    if vocab is not None:  # only rows added (ids above every known one, and the counts agree): extend it
        stored_count = vocab._count
        new = catalog.family_count(family, min_id=vocab._max_id + 1)
        if catalog.family_count(family) != vocab._count + new or not vocab.add_rows(
            catalog.word_rows(family, min_id=vocab._max_id + 1)
        ):
            vocab = None
        elif new <= RESAVE_SHARE * stored_count:  # a few rows: read again from the catalog at each open (work
            vocab._stored = path  # proportional to them) rather than rewriting the whole file per add
            return vocab.attach(rows)
    if vocab is None:
        vocab = Vocabulary.compact_from(lambda: catalog.word_rows(family))
    tmp = path.with_suffix(".tmp")
    vocab.save(tmp, version)
    tmp.replace(path)
    vocab._stored = path
    return vocab.attach(rows)
