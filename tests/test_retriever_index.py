"""The vector index of large catalogs (retriever/vector_index.py), on small synthetic catalogs with the
threshold lowered: its top-20 against the exact scan of every row, incremental updates, reopening without a
rebuild, a broken index file, and the compact vocabulary's incremental adds against a fresh build."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.retrieval import SyntheticVectors, _Encoder, synthetic_catalog
from lora_composer.retriever.catalog import Catalog
from lora_composer.retriever.phrases import Vocabulary, tokens
from lora_composer.retriever.search import Retriever, recall_at
from lora_composer.retriever.vector_index import VectorIndex

D = 256  # a text width where chance cosines sit well below a match (SD1.5: 768); at 32-64 4-bit PQ blurs them
N = 3000


def _retriever(cat, vec, exact: bool = False) -> Retriever:
    r = Retriever(cat, _Encoder(vec), family="sd15", source=vec)
    r.exact_rows = 10**9 if exact else 0
    return r


def _prompts(vec, n_rows: int, count: int = 12, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, int(vec.cluster([n_rows])[0]), count)
    return [f"cluster{int(c)} neon glow w{int(rng.integers(5000))}" for c in clusters]


def _top(r, prompt, k=20):
    e = r.encoder.encode_one(prompt)
    return r.search_encoded(prompt, e, e.vector.numpy(), limit=k)


@pytest.fixture()
def catalog(tmp_path):
    cat = synthetic_catalog(tmp_path / "cat.sqlite", N)
    yield cat
    cat.close()


def test_index_top20_matches_the_exact_scan(catalog):
    """The index path's top 20 (stage 1 on FAISS, exact rescore) against two references: the exact fused
    score of every row (``scan_all``) and the in-memory exact path's ranking. Many rows tie (the same lexical
    share, no dense signal), so rankings are compared by score rank by rank (``recall_at``)."""
    vec = SyntheticVectors(D)
    fast, exact = _retriever(catalog, vec), _retriever(catalog, vec, exact=True)
    fast.refresh()
    exact.refresh()
    assert fast.index is not None and exact.index is None
    recalls = []
    for prompt in _prompts(vec, N):
        got = _top(fast, prompt)
        ref = _top(exact, prompt)
        e = fast.encoder.encode_one(prompt)
        full = fast.scan_all(prompt, e, e.vector.numpy())
        assert [s for _, s in full] == pytest.approx([m.score for m in ref], abs=1e-5)  # the references agree
        recalls.append(recall_at(got, full))
        by = dict(full)
        assert all(m.score == pytest.approx(by[m.row.id], abs=1e-5) for m in got if m.row.id in by)
    assert np.mean(recalls) >= 0.95 and min(recalls) >= 0.8, recalls
    # the measure can fail: a ranking that misses the best rows
    assert recall_at(got[5:], full) < 0.9


def test_incremental_update_adds_changes_and_removes_in_place(catalog, monkeypatch):
    vec = SyntheticVectors(D)
    r = _retriever(catalog, vec)
    r.refresh()
    slots_before = len(r.index.ids)
    synthetic_catalog(catalog.path, 200, start=N + 1).close()  # 200 new files
    gone = list(range(5, 105))  # 100 removed
    catalog.db.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in gone])
    catalog.db.executemany("DELETE FROM fts WHERE rowid = ?", [(i,) for i in gone])
    changed = list(range(500, 550))  # 50 re-indexed (content changed: a new stamp)
    catalog.db.executemany("UPDATE files SET indexed_at = indexed_at + 0.5 WHERE id = ?", [(i,) for i in changed])
    catalog._bump()
    catalog.db.commit()
    monkeypatch.setattr(VectorIndex, "build", lambda *a, **k: pytest.fail("an update must not rebuild"))
    fetched = []
    real_fetch = vec.fetch
    monkeypatch.setattr(vec, "fetch", lambda ids: (fetched.extend(np.asarray(ids).tolist()), real_fetch(ids))[1])
    r.refresh()
    assert sorted(fetched) == changed + list(range(N + 1, N + 201))  # only the changed rows were read
    assert len(r.index.ids) == slots_before + 250
    live = set(r.index.ids[r.index.live].tolist())
    assert live == set(catalog.family_ids("sd15")[0].tolist()) and not live & set(gone)
    assert r.index.ntotal == len(r.index.ids)  # dead slots stay in FAISS (tombstones), never returned
    assert (
        r.index.index.ntotal == N and len(r.index.segments) == 1
    )  # index.faiss untouched: a segment holds the new rows
    for prompt in _prompts(vec, N + 200, seed=5):  # the new clusters too
        got = [m.row.id for m in _top(r, prompt)]
        assert not set(got) & set(gone)
        e = r.encoder.encode_one(prompt)
        assert recall_at(_top(r, prompt), r.scan_all(prompt, e, e.vector.numpy())) >= 0.9
    new_cluster = int(vec.cluster([N + 150])[0])
    assert N + 150 in [m.row.id for m in _top(r, f"cluster{new_cluster} x")]


def test_adding_rows_reads_only_the_new_rows(catalog, monkeypatch):
    """Rows only added: the update reads the rows indexed after the newest one held, never every id."""
    vec = SyntheticVectors(D)
    r = _retriever(catalog, vec)
    r.refresh()
    synthetic_catalog(catalog.path, 100, start=N + 1).close()
    calls = []
    real = Catalog.family_ids
    monkeypatch.setattr(
        Catalog, "family_ids", lambda self, family=None, since=None: (calls.append(since), real(self, family, since))[1]
    )
    monkeypatch.setattr(
        Vocabulary, "compact_from", classmethod(lambda *a: pytest.fail("adding rows must not rebuild the vocabulary"))
    )
    r.refresh()
    assert calls and all(c is not None for c in calls)  # no full read of ids
    assert len(r.index.ids) == N + 100 and r.by_id.get(N + 100) == N + 99
    assert {int(i) for i in r.vocab.rows_for(tokens("lora 3050"))} == set()  # name words: noise, no phrase
    e = r.encoder.encode_one(f"cluster{int(vec.cluster([N + 50])[0])} x")
    assert N + 50 in [m.row.id for m in r.search_encoded("x", e, e.vector.numpy(), limit=20)]


def test_reopening_reads_the_stored_index_and_vocabulary(catalog, monkeypatch):
    vec = SyntheticVectors(D)
    r = _retriever(catalog, vec)
    r.refresh()
    prompts = _prompts(vec, N, count=4)
    before = [[(m.row.id, m.score) for m in _top(r, p)] for p in prompts]
    picks = [[m.name for m in r.select(p, 3)] for p in prompts]
    monkeypatch.setattr(VectorIndex, "build", lambda *a, **k: pytest.fail("reopening must not rebuild"))
    monkeypatch.setattr(vec, "fetch", lambda ids: pytest.fail("reopening must not read vectors"))
    monkeypatch.setattr(Vocabulary, "__init__", lambda *a: pytest.fail("reopening must not rebuild the vocabulary"))
    again = _retriever(Catalog(catalog.path), vec)
    again.refresh()
    assert [[(m.row.id, m.score) for m in _top(again, p)] for p in prompts] == before
    assert [[m.name for m in again.select(p, 3)] for p in prompts] == picks
    assert isinstance(again.matrix, np.memmap)


def test_a_broken_index_file_is_named_and_rebuilt(catalog):
    vec = SyntheticVectors(D)
    r = _retriever(catalog, vec)
    r.refresh()
    folder = r.index.folder
    (folder / "vectors.f32").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError) as err:
        VectorIndex(folder).open()
    assert str(folder / "vectors.f32") in str(err.value) and "\n" not in str(err.value)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        VectorIndex(folder).open()
    again = _retriever(Catalog(catalog.path), vec)
    again.refresh()  # derived data: rebuilt from the catalog
    prompt = _prompts(vec, N, count=1)[0]
    e = again.encoder.encode_one(prompt)
    assert recall_at(_top(again, prompt), again.scan_all(prompt, e, e.vector.numpy())) >= 0.9
    assert json.loads((folder / "meta.json").read_text())["slots"] == N


class _Row:
    def __init__(self, id, name, trig, desc):
        self.id, self.name, self.trigger_words, self.description = id, name, trig, desc


ROWS = [
    _Row(1, "pixel-art_v2", ["pixel art"], "8-bit pixel art of castles"),
    _Row(2, "ink", ["ink sketch"], "monochrome ink drawing"),
    _Row(3, "checkered", ["checkered background"], "a checkerboard backdrop"),
    _Row(4, "neon", ["neon glow"], "glowing neon signs at night"),
]
MORE = [
    _Row(5, "watercolour", ["watercolor wash"], "soft watercolour painting"),
    _Row(6, "castle-ruins", ["castle ruins"], "old castle ruins in fog"),
]


def _same(a: Vocabulary, b: Vocabulary, rows) -> None:
    lookup = {r.id: r for r in rows}
    a.attach(lookup)
    prompts = [
        "a pixel art castle in ink, watercolor wash",
        "castle ruins on a checkered background, neon glow",
        "monochrome glowing signs",
        "soft painting of fog",
    ]
    for p in prompts:
        words = tokens(p)
        assert {int(i) for i in a.rows_for(words)} == b.rows_for(words)
        for r in rows:
            assert a.claims(r.id, words) == b.claims(r.id, words)
            assert a.category.get(r.id) == b.category.get(r.id)
    assert a.generic == b.generic and a._desc_df == b._desc_df and a._n == b._n


def test_compact_vocabulary_adds_rows_as_a_fresh_build_would():
    grown = Vocabulary(ROWS).compact()
    assert grown.add_rows(MORE)
    _same(grown, Vocabulary(ROWS + MORE), ROWS + MORE)
    _same(Vocabulary.compact_from(lambda: iter(ROWS + MORE)), Vocabulary(ROWS + MORE), ROWS + MORE)
    # a second "... background" phrase makes "background" generic: that needs a rebuild, and says so
    flip = Vocabulary(ROWS).compact()
    assert not flip.add_rows([_Row(7, "wavy", ["wavy background"], "")])


def test_the_stored_vocabulary_is_data_not_a_pickle(tmp_path):
    """Stored beside the catalog (a folder users hand around), the vocabulary loads with numpy's
    allow_pickle=False and answers as the one it was saved from, extended rows included."""
    import numpy as np

    grown = Vocabulary(ROWS).compact()
    assert grown.add_rows(MORE)
    grown.save(tmp_path / "vocabulary.npz", "v7")
    with np.load(tmp_path / "vocabulary.npz", allow_pickle=False) as data:
        assert {"meta", "index_ids", "index_offsets", "desc_ids", "desc_offsets"} <= set(data.files)
    version, loaded = Vocabulary.load(tmp_path / "vocabulary.npz")
    assert version == "v7"
    _same(loaded, Vocabulary(ROWS + MORE), ROWS + MORE)


def test_compose_index_with_a_model_builds_the_vector_index(tmp_path, monkeypatch, capsys):
    """``compose index DIR --model M`` on a family above the (lowered) threshold leaves the vector index on disk
    beside the catalog, and ``--rebuild`` starts it over."""
    import importlib

    from lora_composer import tiny
    from lora_composer.frontends.cli import main

    monkeypatch.setattr(importlib.import_module("lora_composer.retriever.search"), "EXACT_ROWS", 0)
    monkeypatch.setenv("LORA_COMPOSER_HOME", str(tmp_path / "home"))
    pipe = tiny.build_tiny_sd15_pipeline(seed=0)
    model = tmp_path / "model"
    pipe.save_pretrained(str(model))
    lib = tmp_path / "lib"
    for i in range(3):
        tiny.save_diffusers_lora(
            pipe, tiny.random_lora_layers(pipe, rank=2, seed=i, text_encoder=False), lib / f"l{i}.safetensors", rank=2
        )
    assert main(["index", str(lib), "--model", str(model), "-q"]) == 0
    metas = list((lib / ".lora-composer" / "vectors").glob("*/meta.json"))
    assert len(metas) == 1 and json.loads(metas[0].read_text())["slots"] == 3
    uid = json.loads(metas[0].read_text())["uid"]
    assert main(["index", str(lib), "--model", str(model), "--rebuild", "-q"]) == 0
    assert json.loads(metas[0].read_text())["uid"] != uid  # a new catalog, a new index
    capsys.readouterr()


def test_adds_write_segments_not_the_index_file(catalog, monkeypatch):
    """Rows added go to small segment files: index.faiss and vocabulary.npz are not rewritten; past
    MAX_SEGMENTS the segments become one; past COMPACT_SHARE of index.faiss's rows they are folded into it;
    every state answers as the exact scan does, and reopens from disk."""
    import importlib

    vi_mod = importlib.import_module("lora_composer.retriever.vector_index")
    vec = SyntheticVectors(D)
    r = _retriever(catalog, vec)
    r.refresh()
    folder = r.index.folder
    stamp = lambda name: (folder / name).stat().st_mtime_ns  # noqa: E731
    index_at, vocab_at = stamp("index.faiss"), stamp("vocabulary.npz")
    start = N + 1
    for step in range(vi_mod.MAX_SEGMENTS + 1):
        synthetic_catalog(catalog.path, 50, start=start).close()
        start += 50
        r.refresh()
        assert stamp("index.faiss") == index_at and stamp("vocabulary.npz") == vocab_at
        assert len(r.index.segments) == (step + 1 if step < vi_mod.MAX_SEGMENTS else 1)
        assert r.index.ntotal == len(r.index.ids) == start - 1
    assert sorted(p.name for p in folder.glob("seg-*.faiss")) == r.index.meta["segments"]
    new_cluster = int(vec.cluster([start - 10])[0])
    assert start - 10 in [m.row.id for m in _top(r, f"cluster{new_cluster} x")]
    monkeypatch.setattr(vi_mod, "COMPACT_SHARE", 0.05)  # the next add folds the segments into index.faiss
    synthetic_catalog(catalog.path, 50, start=start).close()
    r.refresh()
    assert stamp("index.faiss") != index_at and r.index.segments == [] and not list(folder.glob("seg-*.faiss"))
    assert r.index.index.ntotal == len(r.index.ids) == start + 49
    prompts = _prompts(vec, start + 49, count=4, seed=9)
    before = [[(m.row.id, m.score) for m in _top(r, p)] for p in prompts]
    again = _retriever(Catalog(catalog.path), vec)
    again.refresh()
    assert [[(m.row.id, m.score) for m in _top(again, p)] for p in prompts] == before
    for p in prompts:
        e = again.encoder.encode_one(p)
        assert recall_at(_top(again, p), again.scan_all(p, e, e.vector.numpy())) >= 0.9


def test_lexical_stage_in_a_worker_thread_or_in_line_gives_the_same_ranking(catalog, monkeypatch):
    """The vector-index path runs FTS5 on a second read-only connection in a worker thread; where that
    connection cannot be opened it runs in line, with the same result."""
    import sqlite3

    vec = SyntheticVectors(D)
    threaded = _retriever(catalog, vec)
    threaded.refresh()
    prompts = _prompts(vec, N, count=3, seed=11)
    got = [[(m.row.id, m.score, m.signals.get("lexical")) for m in _top(threaded, p)] for p in prompts]
    assert threaded._pool and "lexical wait" in threaded.stages
    assert any(lex for row in got for _, _, lex in row)  # the lexical signal took part

    def refuse(self):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(Catalog, "reader", refuse)
    inline = _retriever(Catalog(catalog.path), vec)
    inline.refresh()
    assert [[(m.row.id, m.score, m.signals.get("lexical")) for m in _top(inline, p)] for p in prompts] == got
    assert inline._pool is False and "lexical wait" not in inline.stages


def test_a_word_too_common_to_discriminate_is_left_out_and_a_rare_trigger_still_found(catalog, monkeypatch):
    """Above the exact-scan threshold a prompt word more than ``COMMON_WORD_ROWS`` rows share is left out of
    the FTS5 query and of the rows the prompt's words name; a trigger word few rows have is still matched,
    read and picked, and the in-memory path (small catalogs) still matches every word."""
    import importlib

    search = importlib.import_module("lora_composer.retriever.search")
    common, rare = list(range(1, search.COMMON_WORD_ROWS + 51)), 2777
    for ids, word in ((common, "inkwash"), ([rare], "moonquill")):
        catalog.db.executemany(
            "UPDATE files SET trigger_words = ? WHERE id = ?", [(json.dumps([word]), i) for i in ids]
        )
        catalog.db.executemany("UPDATE fts SET trigger_words = ? WHERE rowid = ?", [(word, i) for i in ids])
    catalog._bump()
    catalog.db.commit()
    vec = SyntheticVectors(D)
    fast, exact = _retriever(catalog, vec), _retriever(catalog, vec, exact=True)
    fast.refresh()
    exact.refresh()
    prompt = "moonquill inkwash"
    lex, _ = fast._lexical(prompt)
    assert set(lex) == {rare} and lex[rare][0] == 1.0  # scored against both words, matched by the rare one
    assert set(common) <= set(exact._lexical(prompt)[0])  # the small-catalog path: every word matched
    assert fast.catalog.fts_common(["inkwash", "moonquill", "nosuchword"], search.COMMON_WORD_ROWS) == {"inkwash"}

    def named(r):
        return len({m.row.id for m in r.candidates(prompt)} & set(common))

    chosen = fast.select(prompt, 4)
    assert [m.row.id for m in chosen] == [rare] and chosen[0].claim.kind == "trigger"
    assert named(fast) < search.INCLUDE_PER_WORD  # the common word's rows were not read as named ones
    monkeypatch.setattr(search, "COMMON_WORD_ROWS", 10**9)  # without the bound they are (the check can fail)
    fast.catalog._fts_counts = None
    assert named(fast) >= search.INCLUDE_PER_WORD
