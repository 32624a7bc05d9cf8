"""Retrieval at catalog scale (1K/10K/100K/1M rows), index throughput, recall@3 per signal, selection.

    python -m bench.retrieval [--tiny] [--no-write] [--threads N] [--sizes N ...] [--parts scale recall selection]

- Scale: synthetic catalogs with clusters of near-duplicates (:class:`SyntheticVectors`; SQLite rows with
  FTS5 text), d = 768 (text block + 2 weight directions = 2304 columns): first open (index build), load,
  ``--loras auto`` p50/p95 with the prompt encoding timed apart, the index's top-20 recall against the exact
  scan, resident memory, and adding 1,000 rows; each size in its own process.
- Index throughput: ``Catalog.index`` on a folder of small LoRAs of the tiny SD1.5-shaped pipeline (rank 4,
  every attention layer of the UNet and text encoder), cold (all new) and warm (nothing changed).
- Recall@3: a labelled set on the tiny pipeline with a token-identity-preserving text encoder: one concept
  adapter per concept word (its cross-attention k/v deltas read that word's state), half of them described
  (trigger word = the concept, a one-line description), half undescribed, plus random distractors with
  unrelated descriptions; queries name one concept inside a longer prompt; the label is its adapter.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import common

NAME = "retrieval"
RECALL_COLUMNS = ["signal", "recall@3 (all)", "recall@3 (described)", "recall@3 (undescribed)", "queries"]
CONCEPTS = (
    "castle",
    "dragon",
    "forest",
    "robot",
    "ocean",
    "kitten",
    "desert",
    "pirate",
    "wizard",
    "train",
    "flower",
    "tiger",
    "mountain",
    "guitar",
    "rocket",
    "samurai",
    "bridge",
    "owl",
    "volcano",
    "lantern",
)
TEMPLATES = ("a {} on a hill at night", "a beautiful painting of a {} in the snow", "photo of an old {}, detailed")
PASSES = 3  # passes of the --loras auto queries per size (each pass's p50 reported)
VOCAB = "ink pixel anime watercolor portrait neon glow retro gothic pastel film grain studio light cozy dark".split()


class _Encoded:
    def __init__(self, tokens, words):
        self.tokens, self.words = tokens, words


class SyntheticVectors:
    """A synthetic catalog's dense rows, drawn so near neighbours exist, as in real catalogs: rows come in
    clusters of near-duplicates (re-uploads, versions, merges of one LoRA; sizes 1-30, mean about 5) around a
    cluster centre per block (text, each weight direction), each row = centre + noise (cosine ~0.9 to its
    centre); a quarter of the rows are undescribed (no text block). Row ``id``'s vector depends only on the
    id and the seed, so rows added later (the incremental-add figure) are drawn the same way."""

    def __init__(self, d: int, seed: int = 0, family: str = "sd15"):
        from lora_composer.retriever.search import DIRECTIONS

        self.d, self.seed, self.family = d, seed, family
        self.blocks = {"text": (0, d), "weights": (d, DIRECTIONS * d)}
        self.width = (1 + DIRECTIONS) * d
        self.dim = d
        self.key = f"{family}-synthetic-{d}-{seed}"
        sizes = np.minimum(np.random.default_rng(seed).geometric(0.2, 2_000_000), 30)
        self.starts = np.concatenate([[1], 1 + np.cumsum(sizes)])  # cluster c holds ids [starts[c], starts[c+1])

    def ensure(self) -> None:
        pass

    def cluster(self, ids) -> np.ndarray:
        return np.searchsorted(self.starts, np.asarray(ids), side="right") - 1

    def centre(self, c: int) -> np.ndarray:
        """[1 + DIRECTIONS, d] unit vectors."""
        v = (
            np.random.default_rng([self.seed, 7, int(c)])
            .standard_normal((self.width // self.d, self.d))
            .astype(np.float32)
        )
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def fetch(self, ids):
        ids = np.asarray(ids, np.int64)
        nb = self.width // self.d
        out = np.empty((len(ids), nb, self.d), np.float32)
        cl = self.cluster(ids)
        for c in np.unique(cl):
            at = np.flatnonzero(cl == c)
            out[at] = self.centre(c)
        rng = np.random.default_rng([self.seed, 11, int(ids[0]) if len(ids) else 0, len(ids)])
        out += (0.5 / np.sqrt(self.d)) * rng.standard_normal(out.shape, dtype=np.float32)
        out /= np.linalg.norm(out, axis=2, keepdims=True)
        out[:, 1] *= np.sqrt(0.8)  # the weight directions carry 80% / 20% of the response energy
        out[:, 2:] *= np.sqrt(0.2)
        described = (ids % 4) != 0
        out[~described, 0] = 0
        present = np.stack([described, np.ones(len(ids), bool)], 1)
        return out.reshape(len(ids), self.width), present


class _Encoder:
    """A stand-in text encoder: 8 unit token vectors per prompt, drawn from the prompt's hash, the first one
    near the weight direction of the cluster the prompt names (``clusterN``, when it names one) and the text
    vector near that cluster's text centre, so a query has true near neighbours to find; encoding is timed
    apart from the query."""

    family = "sd15"

    def __init__(self, vectors: SyntheticVectors):
        self.v = vectors
        self.d = vectors.d
        self.id = "synthetic"

    def encode_one(self, prompt: str):
        import re
        import zlib

        rng = np.random.default_rng(zlib.crc32(prompt.encode()))
        tokens = rng.standard_normal((8, self.d)).astype(np.float32)
        tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
        named = re.search(r"cluster(\d+)", prompt)
        text = tokens.mean(0)
        if named:
            centre = self.v.centre(int(named.group(1)))
            tokens[0] = centre[1] + (0.6 / np.sqrt(self.d)) * rng.standard_normal(self.d).astype(np.float32)
            tokens[0] /= np.linalg.norm(tokens[0])
            text = centre[0] + (0.6 / np.sqrt(self.d)) * rng.standard_normal(self.d).astype(np.float32)
        enc = _Encoded(torch.from_numpy(tokens), prompt.split()[:8] + ["x"] * max(0, 8 - len(prompt.split())))
        enc.vector = torch.from_numpy(text / np.linalg.norm(text))
        return enc


def synthetic_catalog(path: Path, n: int, start: int = 1, seed: int = 0):
    """Add rows ``start .. start + n - 1`` (SQLite ``files`` + FTS5: a name, two trigger words and a 12-word
    description from a 5,000-word vocabulary) to the catalog at ``path``; returns it open."""
    from lora_composer.retriever.catalog import Catalog

    rng = np.random.default_rng([seed, start])
    cat = Catalog(path)
    words = [f"w{i}" for i in range(5000)] + VOCAB
    cols = (
        "id, path, sha256, short_hash, size, mtime_ns, side_mtime_ns, name, family, rank, targets, trigger_words, "
        "tags, description, preferred_weight, preview, weight_dirs, weight_dim, weight_energy, indexed_at"
    )
    for a in range(start, start + n, 50_000):
        b = min(start + n, a + 50_000)
        trig = rng.integers(0, len(words), (b - a, 2))
        desc = rng.integers(0, len(words), (b - a, 12))
        files, fts = [], []
        for k, i in enumerate(range(a, b)):
            t = [words[j] for j in trig[k]]
            dsc = " ".join(words[j] for j in desc[k])
            files.append(
                (
                    i,
                    f"/lib/lora-{i}.safetensors",
                    f"{i:064x}",
                    f"{i:012x}",
                    1000,
                    0,
                    0,
                    f"lora-{i}",
                    "sd15",
                    8,
                    "[]",
                    json.dumps(t),
                    "[]",
                    dsc,
                    None,
                    None,
                    None,
                    None,
                    None,
                    float(i),
                )
            )
            fts.append((i, f"lora-{i}", ", ".join(t), "", dsc))
        cat.db.executemany(f"INSERT INTO files ({cols}) VALUES (" + ",".join("?" * 20) + ")", files)
        cat.db.executemany("INSERT INTO fts (rowid, name, trigger_words, tags, description) VALUES (?,?,?,?,?)", fts)
        cat.db.commit()
    cat._bump()
    cat.db.commit()
    return cat


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale_build(n: int, d: int, folder: Path) -> dict:
    """Write a catalog of ``n`` synthetic rows and open it once: the vector index, its vectors and the
    vocabulary are built and stored (its own process: the build's memory is not the query process's)."""
    from lora_composer.retriever.search import Retriever

    vec = SyntheticVectors(d)
    t0 = time.perf_counter()
    cat = synthetic_catalog(folder / f"n{n}" / "catalog.sqlite", n)
    common.log(f"scale {n}: catalog written in {time.perf_counter() - t0:.0f} s")
    r = Retriever(cat, _Encoder(vec), family="sd15", source=vec)
    t0 = time.perf_counter()
    r.refresh()
    build = time.perf_counter() - t0
    common.log(f"scale {n}: first open (index build) {build:.1f} s, peak RSS {_peak_mb():.0f} MB")
    cat.close()
    return {"build (s)": build, "build peak RSS (MB)": _peak_mb()}


def _written() -> int:
    """Bytes this process has handed to write() so far (``/proc/self/io`` wchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def _index_mb(path: Path):
    got = list((path.parent / "vectors").glob("*/index.faiss"))
    return got[0].stat().st_size / 2**20 if got else None


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_one(
    n: int, d: int, queries: int, folder: Path, add: int = 1000, recall_queries: int = 10, top_k: int = 4
) -> dict:
    """Open the catalog :func:`scale_build` wrote (a fresh process), time queries, measure recall and memory,
    then add ``add`` rows."""
    from lora_composer.retriever.catalog import Catalog
    from lora_composer.retriever.search import DEFAULT_MIN_SCORE, Retriever, recall_at

    vec = SyntheticVectors(d)
    path = folder / f"n{n}" / "catalog.sqlite"
    enc = _Encoder(vec)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    cat = Catalog(path)
    r = Retriever(cat, enc, family="sd15", source=vec)
    r.refresh()
    load = time.perf_counter() - t0
    rss_open = _rss_mb()
    rng = np.random.default_rng(1)
    n_clusters = int(vec.cluster([n])[0])
    prompts = [
        f"cluster{int(c)} " + " ".join(rng.choice(VOCAB, 3)) + f" w{int(rng.integers(5000))}"
        for c in rng.integers(0, n_clusters, queries + 3)
    ]
    encoded, times = {}, {"encode": [], "search": [], "select": [], "cpu": []}
    r.encoder = type(
        "Cached", (), {"encode_one": staticmethod(lambda p: encoded[p]), "family": "sd15", "id": "synthetic"}
    )()
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        encoded[prompt] = enc.encode_one(prompt)
        times["encode"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        r.search(prompt, limit=20)
        if i >= 3:
            times["search"].append((time.perf_counter() - t0) * 1000)
    # --loras auto: several passes over the prompts (the first 3 are warm-up), each pass's p50 kept apart
    stages, passes = {}, []
    for _ in range(PASSES):
        one = []
        for i, prompt in enumerate(prompts):
            c0, t0 = time.process_time(), time.perf_counter()
            r.select(prompt, top_k)
            wall, cpu = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
            if i >= 3:
                one.append(wall)
                times["cpu"].append(cpu)
                for k, v in r.stages.items():
                    stages.setdefault(k, []).append(v)
        passes.append(statistics.median(one))
        times["select"] += one
    load_q = os.getloadavg()[0]
    rss = _rss_mb()
    recall = recall_floor = above = None
    if r.index is not None:  # the index's top-20 against the exact scan of every row
        chosen = prompts[3 : 3 + recall_queries]
        exact = r.scan_all_many([(p, encoded[p], encoded[p].vector.numpy(), None) for p in chosen], limit=20)
        found = [r.search_encoded(p, encoded[p], encoded[p].vector.numpy(), limit=20) for p in chosen]
        recall = float(np.mean([recall_at(f, ex) for f, ex in zip(found, exact)]))
        floor = [[x for x in ex if x[1] >= DEFAULT_MIN_SCORE] for ex in exact]  # what a search listing shows
        recall_floor = float(np.mean([recall_at(f, ex) for f, ex in zip(found, floor)]))
        above = float(np.mean([len(ex) for ex in floor]))
    added = written = None
    if add:
        first = int(cat.db.execute("SELECT MAX(id) FROM files").fetchone()[0]) + 1  # a kept catalog grew before
        synthetic_catalog(path, add, start=first).close()
        w0 = _written()
        t0 = time.perf_counter()
        r.refresh()
        added = time.perf_counter() - t0
        written = (_written() - w0) / 2**20
        assert r.by_id.get(first + add - 1) is not None
    sel = sorted(times["select"])
    out = {
        "catalog rows": f"{n:,}",
        "stage 1": "FAISS IVF-PQ" if r.index is not None else "exact scan",
        "load (s)": load,
        "encode (ms)": statistics.median(times["encode"]),
        "search top-20 (ms)": statistics.median(times["search"]),
        "--loras auto p50 (ms)": statistics.median(sel),
        "--loras auto p95 (ms)": sel[min(len(sel) - 1, int(round(0.95 * (len(sel) - 1))))],
        "p50 per pass (ms)": " / ".join(f"{x:.1f}" for x in passes),
        "CPU p50 (ms)": statistics.median(times["cpu"]),
        "CPU p95 (ms)": sorted(times["cpu"])[min(len(sel) - 1, int(round(0.95 * (len(sel) - 1))))],
        "stages p50 (ms)": ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages.items()),
        "load avg (queries)": load_q,
        "recall@20 vs exact": recall if recall is not None else "exact",
        "recall@20, exact rows >= 0.3": recall_floor if recall_floor is not None else "exact",
        "exact top-20 rows >= 0.3": above if above is not None else "",
        "RSS after open (MB)": rss_open,
        "RSS after queries (MB)": rss,
        "RSS before open (MB)": rss0,
        f"add {add:,} (s)": added,
        f"add {add:,} written (MB)": written,
        "index.faiss (MB)": _index_mb(path),
        "queries": len(sel),
    }
    cat.close()
    return out


def bench_libraries(n: int = 20_000, d: int = 768, queries: int = 50) -> list[dict]:
    """Which library for stage 1: FAISS IVF-PQ fast-scan against usearch HNSW (int8), one thread each, on
    ``n`` clustered rows of the catalog's width: build time, time per query, and recall@20 of the inner
    product after an exact rescore of each one's best 200 (the retriever's use)."""
    import faiss

    faiss.omp_set_num_threads(1)
    vec = SyntheticVectors(d)
    x, _ = vec.fetch(np.arange(1, n + 1))
    rng = np.random.default_rng(0)
    q = x[rng.integers(0, n, queries)] + (0.5 / np.sqrt(d)) * rng.standard_normal((queries, x.shape[1])).astype(
        np.float32
    )
    exact = np.argsort(-(q @ x.T), 1)[:, :20]

    def recall(found):
        top = [c[np.argsort(-(x[c] @ qq))][:20] for c, qq in zip(found, q)]
        return float(np.mean([len(set(a) & set(b)) / 20 for a, b in zip(top, exact)]))

    out = []
    t0 = time.perf_counter()
    index = faiss.index_factory(
        x.shape[1], f"IVF{max(16, int(np.sqrt(n)))},PQ{x.shape[1] // 8}x4fs", faiss.METRIC_INNER_PRODUCT
    )
    index.train(x[:: max(1, n // 10_000)])
    index.add(x)
    build = time.perf_counter() - t0
    index.nprobe = 24
    t0 = time.perf_counter()
    _, found = index.search(q, 200)
    out.append(
        {
            "library": f"faiss-cpu {faiss.__version__} IVF-PQ 4-bit fast-scan",
            "rows": f"{n:,}",
            "build (s)": build,
            "query (ms)": (time.perf_counter() - t0) * 1000 / queries,
            "recall@20 (rescored top 200)": recall(found),
        }
    )
    try:
        import usearch
        from usearch.index import Index
    except ImportError:
        return out
    t0 = time.perf_counter()
    u = Index(ndim=x.shape[1], metric="ip", dtype="i8")
    u.add(np.arange(n), x, threads=1)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = u.search(q, 200, threads=1).keys.astype(np.int64)
    out.append(
        {
            "library": f"usearch {usearch.__version__} HNSW int8",
            "rows": f"{n:,}",
            "build (s)": build,
            "query (ms)": (time.perf_counter() - t0) * 1000 / queries,
            "recall@20 (rescored top 200)": recall(found),
        }
    )
    return out


def bench_scale(
    sizes, d: int, queries: int, add: int, keep: Path | None = None, threads: int | None = None
) -> list[dict]:
    """Each size: build in one fresh Python process, measure in another (resident memory is the query
    process's own); catalogs in a temporary folder, or in ``keep``, where a catalog already built (and grown
    by earlier runs' adds) is reused and its build not timed again."""
    import contextlib
    import subprocess

    out = []
    with contextlib.nullcontext(str(keep)) if keep else tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            row = {}
            reuse = keep is not None and (Path(tmp) / f"n{n}" / "catalog.sqlite").is_file()
            if reuse:
                row.update({"build (s)": "kept", "build peak RSS (MB)": "kept"})
            for call in ([] if reuse else [f"scale_build({n}, {d}, Path({str(tmp)!r}))"]) + [
                f"scale_one({n}, {d}, {queries}, Path({str(tmp)!r}), add={add})"
            ]:
                code = (
                    f"import json, sys; from pathlib import Path; from bench.retrieval import scale_build, scale_one; "
                    f"print('RESULT' + json.dumps({call}))"
                )
                env = dict(os.environ)
                if threads:  # numpy's BLAS and FAISS's OpenMP: on a shared 2-core machine extra threads wait for slices
                    env.update(
                        OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
                    )
                proc = subprocess.run(
                    [sys.executable, "-c", code], cwd=common.ROOT, capture_output=True, text=True, env=env
                )
                sys.stderr.write(proc.stderr[-3000:])
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
                if proc.returncode or line is None:
                    raise RuntimeError(f"bench.retrieval: size {n} failed:\n{proc.stderr[-2000:]}")
                row.update(json.loads(line[6:]))
            cols = ["catalog rows", "stage 1", "build (s)", "build peak RSS (MB)"]
            out.append({**{c: row[c] for c in cols}, **{c: v for c, v in row.items() if c not in cols}})
            common.log(f"scale {n}: {out[-1]}")
    return out


def _identity_pipe():
    from lora_composer import tiny

    pipe = tiny.build_tiny_sd15_pipeline(seed=0)
    te = pipe.text_encoder
    layers = te.text_model.encoder.layers if hasattr(te, "text_model") else te.encoder.layers
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.out_proj.weight.mul_(0.02)
            layer.mlp.fc2.weight.mul_(0.02)
    return pipe


def bench_index(pipe, count: int) -> dict:
    from lora_composer import tiny
    from lora_composer.retriever.catalog import Catalog

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "lib"
        for i in range(count):
            tiny.save_diffusers_lora(
                pipe, tiny.random_lora_layers(pipe, rank=4, seed=i), root / f"l{i}.safetensors", rank=4
            )
        size = sum(p.stat().st_size for p in root.iterdir()) / count / 1024
        with Catalog.for_library(root) as cat:
            t0 = time.perf_counter()
            rep = cat.index(progress=False)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            warm_rep = cat.index(progress=False)
            warm = time.perf_counter() - t0
    assert rep.indexed == count and warm_rep.unchanged == count
    return {
        "files": count,
        "file size (KiB)": round(size, 1),
        "cold (files/s)": count / cold,
        "warm (files/s)": count / warm,
    }


def bench_recall(pipe, concepts, distractors: int, epochs: int = 100) -> tuple[list[dict], dict]:
    from lora_composer import tiny
    from lora_composer.retriever.catalog import Catalog
    from lora_composer.retriever.encoder import TextEncoder
    from lora_composer.retriever.search import Retriever
    from lora_composer.retriever.signals import learned

    enc = TextEncoder(pipe)
    gen = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "lib"
        label = {}
        for i, word in enumerate(concepts):
            direction = enc.encode_one(f"a {word}").tokens[-1]
            layers = tiny.random_lora_layers(pipe, rank=2, seed=100 + i, text_encoder=False)
            for key in list(layers["unet"]):
                if (".attn2.to_k." in key or ".attn2.to_v." in key) and key.endswith("lora_A.weight"):
                    a = torch.randn(layers["unet"][key].shape, generator=gen) * 0.01
                    a[0] = direction
                    layers["unet"][key] = a
            name = f"c{i:02d}"
            path = tiny.save_diffusers_lora(pipe, layers, root / f"{name}.safetensors", rank=2)
            if i % 2 == 0:
                path.with_name(name + ".civitai.info").write_text(
                    json.dumps({"trainedWords": [word], "description": f"{word} LoRA"})
                )
            label[word] = (name, i % 2 == 0)
        for j in range(distractors):
            path = tiny.save_diffusers_lora(
                pipe,
                tiny.random_lora_layers(pipe, rank=2, seed=500 + j, text_encoder=False),
                root / f"d{j:02d}.safetensors",
                rank=2,
            )
            path.with_name(f"d{j:02d}.civitai.info").write_text(
                json.dumps({"trainedWords": rnd.sample(VOCAB, 2), "description": " ".join(rnd.sample(VOCAB, 5))})
            )
        with Catalog.for_library(root) as cat:
            cat.index(progress=False)
            cat.encoder_mean(enc)
            _, train = learned.train_for_library(cat, root, enc, epochs=epochs)
            with_learned = Retriever(cat, enc, learned=learned.load_for(cat, root, enc))
            default = Retriever(cat, enc)  # what retriever_for builds: the learned signal is opt-in
            rows = []
            for signal in ("lexical", "text", "weights", "learned", "fused (default)", "fused + learned"):
                r = default if signal == "fused (default)" else with_learned
                hits = {True: [], False: []}
                for word, (name, described) in label.items():
                    for t in TEMPLATES:
                        found = r.search(
                            t.format(word), limit=3, signals=None if signal.startswith("fused") else [signal]
                        )
                        hits[described].append(name in [m.name for m in found])
                allh = hits[True] + hits[False]
                rows.append(
                    {
                        "signal": signal,
                        "recall@3 (all)": sum(allh) / len(allh),
                        "recall@3 (described)": sum(hits[True]) / len(hits[True]),
                        "recall@3 (undescribed)": sum(hits[False]) / len(hits[False]),
                        "queries": len(allh),
                    }
                )
    return rows, train


SELECTION_COLUMNS = ["library", "prompt set", "prompts", "precision", "recall", "base-only prompts with a pick"]


def bench_selection(tiny: bool) -> tuple[list[dict], list[dict]]:
    """``--loras auto`` on the mini world (its model and shipped 9-LoRA library, then a 60-adapter library
    synthesised from it): thresholds fitted on the tuning set, figures on the held-out set."""
    from lora_composer.miniworld import assets
    from lora_composer.miniworld.evaluate import retrieval_report, synthetic_library
    from lora_composer.pipeline import ComposerPipeline

    pipe = ComposerPipeline.from_pretrained(assets.model_dir(), library=assets.library_dir())
    kw = {"sizes": (1, 2), "base": 10} if tiny else {}
    reports = [("shipped (9)", retrieval_report(pipe, store=not tiny, **kw))]
    with tempfile.TemporaryDirectory() as tmp:
        label = synthetic_library(Path(tmp) / "lib")
        reports.append((f"synthetic ({len(label)})", retrieval_report(pipe, Path(tmp) / "lib", label, **kw)))
    rows = []
    for lib, rep in reports:
        for name, r in rep["held_out"].items():
            rows.append(
                {
                    "library": lib,
                    "prompt set": name,
                    "prompts": r["prompts"],
                    "precision": r["precision"],
                    "recall": r["recall"],
                    "base-only prompts with a pick": r["fp_rate"] if name.startswith("base") else "",
                }
            )
    return rows, [{"library": lib, **rep["thresholds"]} for lib, rep in reports]


NOTE_PREFIXES = {  # how the notes of each part begin (a run of some parts keeps the others' notes)
    "libraries": ("Stage-1 library, measured", "FAISS for stage 1:"),
    "recall": (
        "Index throughput,",
        "Recall@3 on the labelled set",
        "Undescribed files have no lexical",
        "On adapters it never saw",
    ),
    "selection": ("Selection (`--loras auto`",),
}


def _kept_notes(parts: list[str]) -> list[str]:
    """The notes of ``parts`` from the section now in docs/BENCHMARKS.md, headed by the run they come from."""
    import re

    text = common.DOCS.read_text() if common.DOCS.exists() else ""
    m = re.search(f"<!-- bench:{NAME} -->(.*?)<!-- /bench:{NAME} -->", text, re.S)
    if not m or not parts:
        return []
    body = m.group(1)
    every = [x for ps in NOTE_PREFIXES.values() for x in ps]
    starts = sorted(i.start() for x in every for i in re.finditer("^" + re.escape(x), body, re.M))
    want = tuple(x for p in parts for x in NOTE_PREFIXES[p])
    notes = []
    for a, b in zip(starts, [*starts[1:], len(body)]):
        if body.startswith(want, a):
            notes.append(body[a:b].strip())
    if not notes:
        return []
    date = re.search(r"^- Date: (.*)$", body, re.M)
    command = re.search(r"^- Command: (.*)$", body, re.M)
    origin = f"{date.group(1) if date else '?'}, {command.group(1) if command else '?'}"
    earlier = re.search(r"kept from the earlier run \((.*?)\); this run", body)  # kept twice: the first run's
    head = (
        f"The notes below ({', '.join(parts)}) are kept from the earlier run "
        f"({earlier.group(1) if earlier else origin}); this run did not repeat them."
    )
    return [head, *notes]


def main(argv: list[str] | None = None):
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--add", type=int, default=1000, help="rows added to each catalog for the incremental figure")
    parser.add_argument("--index-files", type=int, default=None)
    parser.add_argument(
        "--catalogs",
        type=Path,
        default=None,
        help="keep the synthetic catalogs here and reuse those already built (their build is not retimed)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["scale", "recall", "selection"],
        choices=["scale", "recall", "selection", "libraries"],
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    common.apply_threads(args.threads)
    sizes = args.sizes or ([1000, 30000] if args.tiny else [1000, 10000, 100000, 1000000])
    files = args.index_files or (10 if args.tiny else 200)
    d = 64 if args.tiny else 768
    import os

    load_before = os.getloadavg()
    scale = (
        bench_scale(sizes, d, 5 if args.tiny else args.queries, args.add, args.catalogs, args.threads)
        if "scale" in args.parts
        else []
    )
    load_after = os.getloadavg()
    res = common.Result(
        NAME,
        "Retrieval: catalog scale (vector index), index throughput, recall@3, selection",
        list(scale[0]) if scale else ["catalog rows"],
        scale,
        command=common.command("bench.retrieval", argv if argv is not None else sys.argv[1:]),
        setup=[
            f"Scale: synthetic catalogs (`SyntheticVectors`: clusters of near-duplicates, sizes 1-30, a quarter "
            f"undescribed; SQLite rows with FTS5 text), text width d = {d} (SD1.5's), row = text block + 2 weight "
            "directions; each size built in one fresh process and measured in another (with `--threads N`: "
            "OMP_NUM_THREADS / OPENBLAS_NUM_THREADS = N there, numpy's BLAS and FAISS). *stage 1*: up to 20,000 rows the exact in-memory scan, above "
            "the FAISS IVF-PQ index on disk (`retriever/vector_index.py`, 8 lists probed per index query). *build*: the first open (vectors written, "
            "index trained and filled, vocabulary built and stored); *load*: opening the catalog again (index read, "
            "vectors memory-mapped, vocabulary read); *encode*: the stand-in prompt encoder, timed apart; *search "
            "top-20*: FTS5 + stage 1 + exact rescore + fusion; *--loras auto*: `Retriever.select` (top_k 4: the "
            "search's candidates plus the rows the prompt's words name, then selection by coverage), p50/p95 over "
            f"{PASSES} passes of the queries (3 warm-up ones not counted), each prompt naming one cluster, each "
            "pass's p50 apart, *CPU p50* the query process's CPU time per query (all its threads: less sensitive "
            "to other jobs than wall time), *stages p50*: `Retriever.stages` (wall ms; on the vector-index path "
            "*lexical* (FTS5) runs in a worker thread during *stage 1* and the first *gather*, *lexical wait* is "
            "what the query then waited for it; *gather*: the candidates' exact rows, read with `pread` through a "
            "32,768-row cache (the rows common prompt words name recur across prompts; each prompt's dense "
            "candidates are mostly rows no other prompt proposes), then the lexical hits not yet read; "
            "*vocabulary*: the rows the prompt's words name; *rows*: building the matches; passes 2 and 3 "
            "repeat pass 1's prompts, so *p50 per pass* shows what the cache adds); "
            "*recall@20 vs exact*: the search's "
            "top 20 against the exact fused score of every row (`Retriever.scan_all`), on 10 prompts, tie-aware "
            "(`search.recall_at`: an exact top-20 row counts as found when the found top 20 holds its score); "
            "*recall@20, exact rows >= 0.3*: the same, counting only the exact top-20 rows with a fused score of at "
            "least 0.3 (`search.DEFAULT_MIN_SCORE`, the floor of a `compose search` listing; *exact top-20 rows >= "
            "0.3*: how many per prompt): a prompt whose words are all common (more than `COMMON_WORD_ROWS` rows "
            "each, as every bench prompt word at 100K and 1M) has no lexical hits, so its exact top 20 is the "
            "named cluster and then rows whose dense scores sit near chance, which no index ranks exactly; "
            f"*RSS*: the query process's resident memory (before open: with torch imported), the build's peak apart; *add*: "
            f"{args.add:,} rows added to the catalog, then the next query's refresh (index, vectors, vocabulary "
            "updated in place); *written*: the bytes that refresh handed to write() (`/proc/self/io` wchar), "
            "beside the size of `index.faiss`, which an add no longer rewrites (rows added go to a segment file). "
            '*build* "kept": a catalog kept from an earlier run (`--catalogs`), its build not timed again.',
            f"Load average (1/5/15 min) before the scale runs {'/'.join(f'{x:.2f}' for x in load_before)}, after "
            f"{'/'.join(f'{x:.2f}' for x in load_after)} ({os.cpu_count()} cores of an AMD EPYC VM, no GPU, shared with other jobs; "
            "*load avg (queries)*: the 1-minute figure after each size's queries): with the machine shared, every "
            "time here is an upper bound.",
        ],
    )
    for row in scale:
        n = int(row["catalog rows"].replace(",", ""))
        if n in (100_000, 1_000_000):
            goals = (
                [("p50 < 20 ms", row["--loras auto p50 (ms)"] < 20)]
                if n == 100_000
                else [
                    ("p50 < 50 ms", row["--loras auto p50 (ms)"] < 50),
                    ("p95 < 100 ms", row["--loras auto p95 (ms)"] < 100),
                    (
                        "recall@20 >= 0.99",
                        isinstance(row["recall@20 vs exact"], float) and row["recall@20 vs exact"] >= 0.99,
                    ),
                    ("load < 5 s", row["load (s)"] < 5),
                    ("RSS < 2 GB", row["RSS after queries (MB)"] < 2048),
                ]
            )
            written, size = row.get(f"add {args.add:,} written (MB)"), row.get("index.faiss (MB)")
            if written is not None and size and n == 1_000_000:  # 9.2 MB of it: the 1,000 exact rows themselves
                goals.append(
                    (f"add {args.add:,} writes {written:.1f} MB, not index.faiss's {size:.0f} MB", written < size / 4)
                )
            res.notes.append(
                f"Goals at {n:,} rows: " + ", ".join(f"{g} {'met' if ok else 'NOT met'}" for g, ok in goals) + "."
            )
    res.extra = {"scale": scale}
    if "libraries" in args.parts:
        libs = bench_libraries(2000 if args.tiny else 20_000, d)
        res.notes.append(
            "Stage-1 library, measured (`bench_libraries`: clustered rows of this width, one thread, 50 queries, "
            "exact rescore of each one's best 200):\n\n"
            + common.Result(NAME, "", list(libs[0]), libs, machine={}).table()
            + "\n\nFAISS for stage 1: it builds several times faster and answers a query an order of magnitude "
            "faster; a `--loras auto` query sends one index query per prompt token, weight direction and sign (65 "
            "for 8 tokens), so per-query cost decides, and the recall that matters, the retriever's top 20 against "
            "the exact fused scan (table above), is what the rescore of the union of those queries reaches."
        )
        res.extra["libraries"] = libs
    if "recall" in args.parts:
        pipe = _identity_pipe()
        index = bench_index(pipe, files)
        recall, train = bench_recall(
            pipe, CONCEPTS[:6] if args.tiny else CONCEPTS, 4 if args.tiny else 30, epochs=10 if args.tiny else 100
        )
        idx_table = common.Result(NAME, "", list(index), [index], machine={}).table()
        rec_table = common.Result(NAME, "", RECALL_COLUMNS, recall, machine={}).table()
        n_lib = len(CONCEPTS[:6] if args.tiny else CONCEPTS) + (4 if args.tiny else 30)
        res.notes.append(
            f"Index throughput, tiny SD1.5-shaped LoRAs (rank 4, UNet and text-encoder attention), `Catalog.index` "
            f"(load, sha256, metadata, weight directions, FTS5 row), no text embedding:\n\n{idx_table}"
        )
        res.notes.append(
            f"Recall@3 on the labelled set ({len(CONCEPTS[:6] if args.tiny else CONCEPTS)} concept adapters, half "
            f"described, {4 if args.tiny else 30} described distractors; {len(TEMPLATES)} prompts per concept; tiny "
            f"pipeline whose text encoder keeps token identity):\n\n{rec_table}"
        )
        res.notes.append(
            "Undescribed files have no lexical or text signal by construction, so only the weight signals can find "
            "them; the preview signal is absent (no local open_clip model). The learned weight encoder is trained on "
            f"this library's {train['adapters']} described adapters (concepts and distractors, {train['epochs']} "
            f"epochs, symmetric InfoNCE {train['loss_before']:.2f} -> {train['loss_after']:.2f}, "
            f"{train['seconds']:.1f} s including loading and embedding every file), so its 'described' column is "
            "measured on its training set and its 'undescribed' column on adapters it never saw (chance: 3 of "
            f"{n_lib} adapters = {3 / n_lib:.2f})."
        )
        unseen = next(row["recall@3 (undescribed)"] for row in recall if row["signal"] == "learned")
        res.notes.append(
            f"On adapters it never saw the learned signal finds {unseen:.2f} at recall@3 against {3 / n_lib:.2f} by "
            + (
                "chance: at chance, it only adds noise to the fused score, so `retriever_for` (`compose search`, "
                "`--loras auto`) leaves it out unless `LORA_COMPOSER_LEARNED=1`; the weight signal alone finds every "
                "undescribed adapter here."
                if unseen <= 1.5 * 3 / n_lib
                else "chance: above chance; it is still opt-in (`LORA_COMPOSER_LEARNED=1`)."
            )
        )
        res.extra.update({"index": index, "recall": recall, "learned_training": train})
    if "selection" in args.parts:
        selection, thresholds = bench_selection(args.tiny)
        sel_table = common.Result(NAME, "", SELECTION_COLUMNS, selection, machine={}).table()
        th_table = common.Result(NAME, "", list(thresholds[0]), thresholds, machine={}).table()
        res.notes.append(
            "Selection (`--loras auto`, top_k 4) on the mini world's model: per-kind thresholds fitted on the tuning "
            "set (world captions drawn with seed 7, the tuning paraphrases of `PARAPHRASES` in "
            "`lora_composer.miniworld.evaluate`), figures on the held-out set (seed 101, the held-out paraphrases; "
            "OOV synonyms never used in fitting). Concepts: every combination of 1-4 LoRA concepts, one per "
            "category; base-only: 60 captions and 60 paraphrases naming no LoRA concept. The 60-adapter library: "
            "the 9 shipped files, 2 near-duplicates of each (weights x (1 + 1% noise), other names and trigger "
            'words), 12 adapters whose trigger differs by one word ("checkered floor", "pixel font") and 21 '
            "unrelated ones (`synthetic_library`); a pick of any copy of a wanted concept counts as right, a second "
            f"copy as a false positive:\n\n{sel_table}\n\nFitted thresholds (the shipped library's are stored in "
            f"its catalog):\n\n{th_table}"
        )
        res.extra.update({"selection": selection, "thresholds": thresholds})
    kept = [] if args.tiny else _kept_notes([p for p in NOTE_PREFIXES if p not in args.parts])
    if kept:
        res.notes += kept
    if not args.no_write:
        common.write_section(NAME, res.markdown())
    res.print()
    return res


if __name__ == "__main__":
    main()
