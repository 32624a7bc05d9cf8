"""A catalog family's dense rows: the column-block layout and the rows of given file ids, read from SQLite.

One layout serves both stage-1 paths (the in-memory exact scan and the on-disk vector index), so a row is
the same vector in either. :class:`LazyRows` and :class:`RowCache` give the index path the catalog rows it
needs (candidates, lexical hits) without reading a million of them at load.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from lora_composer.retriever.signals.weights import DIRECTIONS


class CatalogVectors:
    """Column blocks ``{name: (start, width)}`` (text ``d``, weights ``DIRECTIONS x d``, then learned ``d`` and
    preview when those models exist) and :meth:`fetch`, the rows of some file ids."""

    def __init__(self, catalog, encoder, family: str, learned=None, preview=None):
        self.catalog, self.encoder, self.family = catalog, encoder, family
        self.learned, self.preview = learned, preview
        self.dim = int(encoder.mean.shape[-1])
        widths = [("text", self.dim), ("weights", DIRECTIONS * self.dim)]
        if learned is not None:
            widths.append(("learned", self.dim))
        if preview is not None:
            widths.append(("preview", preview.dim))
        self.blocks, start = {}, 0
        for name, width in widths:
            self.blocks[name] = (start, width)
            start += width
        self.width = start

    @property
    def key(self) -> str:
        """Names the embedding space: a vector index built in another one is never reused."""
        parts = [
            self.family,
            self.encoder.id,
            f"dirs{DIRECTIONS}",
            getattr(self.learned, "id", "-"),
            getattr(self.preview, "id", "-"),
        ]
        return f"{self.family}-{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:16]}"

    def ensure(self) -> None:
        """Embed what has no embedding yet (text, learned, preview) for this family."""
        self.catalog.ensure_text_embeddings(self.encoder, self.family)
        if self.learned is not None and hasattr(self.learned, "ensure_embeddings"):
            self.learned.ensure_embeddings(self.catalog, self.family)
        if self.preview is not None:
            from lora_composer.retriever.signals import preview as preview_mod

            preview_mod.ensure_embeddings(self.catalog, self.preview, self.family)

    def fetch(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """``(float32 [n, width], present bool [n, blocks])`` for file ids; a missing or mis-sized vector is
        zeros and not present."""
        ids = np.asarray(ids, np.int64)
        n = len(ids)
        m = np.zeros((n, self.width), np.float32)
        names = list(self.blocks)
        present = np.zeros((n, len(names)), bool)
        sources = {"text": self.catalog.vectors_of("text", self.encoder.id, ids)}
        dirs = self.catalog.weight_dirs_of(ids)
        sources["weights"] = {i: v[:DIRECTIONS] for i, v in dirs.items() if v.shape[1] == self.dim}
        if self.learned is not None:
            sources["learned"] = self.catalog.vectors_of("learned", self.learned.id, ids)
        if self.preview is not None:
            sources["preview"] = self.catalog.vectors_of("preview", self.preview.id, ids)
        for b, name in enumerate(names):
            a, w = self.blocks[name]
            got = sources[name]
            for i, fid in enumerate(ids.tolist()):
                vec = got.get(fid)
                if vec is not None and vec.size == w:
                    m[i, a : a + w] = vec.reshape(-1)
                    present[i, b] = True
        return m, present


class RowCache:
    """``{file id: Row}`` read from the catalog on first use, the last ``size`` kept."""

    def __init__(self, catalog, size: int = 50_000):
        self.catalog, self.size = catalog, size
        self._rows: OrderedDict = OrderedDict()

    def prefetch(self, ids) -> None:
        todo = [int(i) for i in ids if int(i) not in self._rows]
        if todo:
            self._rows.update(self.catalog.rows_by_ids(todo))
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def get(self, fid, default=None):
        fid = int(fid)
        if fid not in self._rows:
            self.prefetch([fid])
        return self._rows.get(fid, default)

    def __getitem__(self, fid):
        row = self.get(fid)
        if row is None:
            raise KeyError(fid)
        return row

    def __contains__(self, fid) -> bool:
        return self.get(fid) is not None


class LazyRows:
    """The rows by slot of a vector index (``ids[slot]``, -1 = removed), read on demand; ``len`` is the live
    count."""

    def __init__(self, ids: np.ndarray, cache: RowCache):
        self.ids, self.cache = ids, cache
        self._live = int((ids >= 0).sum())

    def __len__(self) -> int:
        return self._live

    def __getitem__(self, slot: int):
        return self.cache[int(self.ids[int(slot)])]

    def __iter__(self):
        for fid in self.ids[self.ids >= 0]:
            yield self.cache[int(fid)]

    def prefetch(self, slots) -> None:
        self.cache.prefetch(self.ids[np.asarray(slots, np.int64)])


class SlotMap:
    """file id -> slot of the live rows (a sorted array, no million-entry dict)."""

    def __init__(self, ids: np.ndarray):
        live = np.flatnonzero(ids >= 0)
        order = np.argsort(ids[live], kind="stable")
        self._ids = ids[live][order]
        self._slots = live[order]

    def slots_of(self, fids) -> np.ndarray:
        """The slots of those ``fids`` that are live (vectorised ``get``)."""
        fids = np.asarray(list(fids), np.int64)
        i = np.minimum(np.searchsorted(self._ids, fids), max(len(self._ids) - 1, 0))
        ok = self._ids[i] == fids if len(self._ids) else np.zeros(len(fids), bool)
        return self._slots[i[ok]]

    def lookup(self, fids) -> tuple[np.ndarray, np.ndarray]:
        """``(slots, found)``: the slots of the live ones among ``fids`` and which of ``fids`` they are."""
        fids = np.asarray(fids, np.int64)
        if not len(self._ids):
            return np.zeros(0, np.int64), np.zeros(len(fids), bool)
        i = np.minimum(np.searchsorted(self._ids, fids), len(self._ids) - 1)
        ok = self._ids[i] == fids
        return self._slots[i[ok]], ok

    def get(self, fid, default=None):
        i = int(np.searchsorted(self._ids, fid))
        return int(self._slots[i]) if i < len(self._ids) and self._ids[i] == fid else default

    def __getitem__(self, fid) -> int:
        got = self.get(fid)
        if got is None:
            raise KeyError(fid)
        return got

    def __contains__(self, fid) -> bool:
        return self.get(fid) is not None
