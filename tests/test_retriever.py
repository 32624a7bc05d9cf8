"""Retriever: catalog, signals, selection, on adapters whose meaning is known by construction.

The tiny text encoder has random weights; its attention and MLP outputs are damped here so each token's
state keeps its identity through the layers (as a trained CLIP's does). A *concept* LoRA's cross-attention
key/value deltas read exactly one direction: the centred state of its concept word. Undescribed concept
files have no name, trigger word or description that says what they do.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from lora_composer import tiny
from lora_composer.retriever import Catalog, Retriever
from lora_composer.retriever.encoder import TextEncoder

CONCEPTS = ("castle", "dragon", "forest", "robot")
UNRELATED = ("a bowl of soup on a table", "portrait of a smiling woman", "a red car in the rain")


def _identity_preserving(pipe):
    te = pipe.text_encoder
    layers = te.text_model.encoder.layers if hasattr(te, "text_model") else te.encoder.layers
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.out_proj.weight.mul_(0.02)
            layer.mlp.fc2.weight.mul_(0.02)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _identity_preserving(tiny.build_tiny_sd15_pipeline(seed=0))


@pytest.fixture(scope="module")
def encoder(pipe):
    return TextEncoder(pipe)


def concept_layers(pipe, direction: torch.Tensor, seed: int, rank: int = 2):
    """PEFT layers: attn2 k/v deltas whose input side is ``direction`` (plus a weak second row), the
    rest of the attention layers random."""
    gen = torch.Generator().manual_seed(seed)
    layers = tiny.random_lora_layers(pipe, rank=rank, seed=seed, text_encoder=False)
    for key in list(layers["unet"]):
        if (".attn2.to_k." in key or ".attn2.to_v." in key) and key.endswith("lora_A.weight"):
            a = torch.randn(layers["unet"][key].shape, generator=gen) * 0.01
            a[0] = direction
            layers["unet"][key] = a
    return layers


def write_lora(pipe, layers, path, rank=2, sidecar=None):
    tiny.save_diffusers_lora(pipe, layers, path, rank=rank)
    if sidecar is not None:
        path.with_name(path.stem + ".civitai.info").write_text(json.dumps(sidecar))
    return path


def concept_direction(encoder, word: str) -> torch.Tensor:
    enc = encoder.encode_one(f"a {word}")
    assert enc.words[-1] == word
    return enc.tokens[-1]


@pytest.fixture(scope="module")
def library(tmp_path_factory, pipe, encoder):
    """Undescribed concept files ``file-N`` (meaning only in their weights), described files with
    trigger words and no concept, random files, a corrupt file, an SDXL file and a near-duplicate."""
    root = tmp_path_factory.mktemp("loras")
    for i, word in enumerate(CONCEPTS):
        write_lora(
            pipe, concept_layers(pipe, concept_direction(encoder, word), seed=10 + i), root / f"file-{i}.safetensors"
        )
    rnd = lambda seed: tiny.random_lora_layers(pipe, rank=2, seed=seed, text_encoder=False)  # noqa: E731
    write_lora(
        pipe,
        rnd(20),
        root / "zorblax-style.safetensors",
        sidecar={"trainedWords": ["zorblax"], "description": "Strange glowing zorblax creatures."},
    )
    write_lora(
        pipe,
        rnd(21),
        root / "ink.safetensors",
        sidecar={
            "trainedWords": ["ink sketch", "monochrome"],
            "description": "Black ink sketches on paper.",
            "preferred weight": 0.6,
        },
    )
    write_lora(
        pipe,
        rnd(22),
        root / "sub" / "ink-v2.safetensors",
        sidecar={"trainedWords": ["ink sketch", "monochrome"], "description": "Second version of the ink style."},
    )
    for seed in range(30, 36):
        write_lora(pipe, rnd(seed), root / f"random-{seed}.safetensors")
    (root / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"x" * 40)
    sdxl = tiny.build_tiny_sdxl_pipeline(seed=0)
    write_lora(
        sdxl,
        tiny.random_lora_layers(sdxl, rank=2, seed=40),
        root / "xl-castle.safetensors",
        sidecar={"trainedWords": ["castle", "zorblax"], "description": "castle castle castle"},
    )
    return root


@pytest.fixture(scope="module")
def catalog(library):
    cat = Catalog.for_library(library)
    report = cat.index(progress=False)
    cat.report = report
    yield cat
    cat.close()


@pytest.fixture(scope="module")
def retriever(catalog, encoder):
    return Retriever(catalog, encoder)


def names(matches):
    return [m.name for m in matches]


def test_an_older_catalog_reads_its_files_again_and_retries_what_it_skipped(tmp_path, pipe):
    """A catalog written before the method column, or by a loader that refused a format since learned, is
    brought up to date by the next index: rows get their method, remembered skips are tried again."""
    lib = tmp_path / "lib"
    write_lora(
        pipe, tiny.random_lora_layers(pipe, rank=2, seed=5, text_encoder=False, conv=True), lib / "a.safetensors"
    )
    write_lora(pipe, tiny.random_lora_layers(pipe, rank=2, seed=6, text_encoder=False), lib / "b.safetensors")
    with Catalog.for_library(lib) as cat:
        assert cat.index(progress=False).indexed == 2
        assert {r.name: r.kinds for r in cat.rows()} == {"a": "LoCon", "b": "LoRA"}
        b = lib / "b.safetensors"
        st = b.stat()
        cat._delete(next(r.id for r in cat.rows() if r.name == "b"))
        cat.db.execute("ALTER TABLE files DROP COLUMN kinds")  # as an older version wrote it
        cat.db.execute(
            "INSERT INTO skipped VALUES (?, ?, ?, ?)", (str(b.resolve()), st.st_size, st.st_mtime_ns, "old refusal")
        )
        cat.set_meta("loader", "an older loader")
        cat.db.commit()
    with Catalog.for_library(lib) as cat:
        report = cat.index(progress=False)
        assert not report.skipped and sorted(os.path.basename(p) for p in report.updated + report.added) == [
            "a.safetensors",
            "b.safetensors",
        ]
        assert {r.name: r.kinds for r in cat.rows()} == {"a": "LoCon", "b": "LoRA"}
    with Catalog.for_library(lib) as cat:  # and nothing is read again after that
        assert cat.index(progress=False).unchanged == 2


def test_index_reports_corrupt_file_and_indexes_the_rest(catalog, library):
    report = catalog.report
    assert len(report.added) == 14 and not report.updated
    assert [os.path.basename(p) for p, _ in report.skipped] == ["broken.safetensors"]
    assert "broken.safetensors" in catalog.skipped()[0][0]
    families = {r.name: r.family for r in catalog.rows()}
    assert families["xl-castle"] == "sdxl" and families["file-0"] == "sd15"
    row = {r.name: r for r in catalog.rows()}["ink"]
    assert row.trigger_words == ["ink sketch", "monochrome"] and row.preferred_weight == 0.6
    assert row.short_hash == row.sha256[:12] and row.rank == 2
    assert any(t.endswith("attn2.to_k") for t in row.targets)


def test_index_is_incremental(tmp_path, pipe):
    root = tmp_path / "lib"
    a = write_lora(pipe, tiny.random_lora_layers(pipe, rank=2, seed=1, text_encoder=False), root / "a.safetensors")
    write_lora(pipe, tiny.random_lora_layers(pipe, rank=2, seed=2, text_encoder=False), root / "b.safetensors")
    with Catalog.for_library(root) as cat:
        assert len(cat.index(progress=False).added) == 2
        again = cat.index(progress=False)
        assert again.unchanged == 2 and again.indexed == 0
        os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))  # touched, same bytes
        touched = cat.index(progress=False)
        assert touched.unchanged == 2 and touched.indexed == 0
        a.with_name("a.civitai.info").write_text(json.dumps({"trainedWords": ["newword"]}))
        side = cat.index(progress=False)
        assert [os.path.basename(p) for p in side.updated] == ["a.safetensors"]
        assert {r.name: r.trigger_words for r in cat.rows()}["a"] == ["newword"]
        assert cat.fts_search(["newword"])
        (root / "b.safetensors").unlink()
        gone = cat.index(progress=False)
        assert [os.path.basename(p) for p in gone.removed] == ["b.safetensors"] and cat.count() == 1


@pytest.mark.parametrize("i,word", list(enumerate(CONCEPTS)))
def test_weight_signal_ranks_the_concept_adapter_first(retriever, i, word):
    for prompt in (f"a {word} on a hill at night", f"a beautiful painting of a {word} in the snow"):
        found = retriever.search(prompt, limit=5, signals=["weights"])
        assert found and found[0].name == f"file-{i}", (prompt, [(m.name, m.score) for m in found])
        assert f'"{word}"' in found[0].reason


@pytest.mark.parametrize("prompt", UNRELATED)
def test_weight_signal_never_picks_concepts_for_unrelated_prompts(retriever, prompt):
    found = retriever.search(prompt, limit=20, signals=["weights"])
    assert not retriever.select(prompt, top_k=3), [(m.name, m.score) for m in found]


def test_lexical_and_text_signals_find_trigger_words(retriever):
    for signal in ("lexical", "text"):
        top = retriever.search("a zorblax in a cave", limit=3, signals=[signal])
        assert top and top[0].name == "zorblax-style", (signal, [(m.name, m.score) for m in top])
        top = retriever.search("a city street in ink sketch", limit=3, signals=[signal])
        assert top and top[0].name in ("ink", "ink-v2"), (signal, [(m.name, m.score) for m in top])


def test_other_family_never_returned(retriever):
    for prompt in ("castle zorblax", "a castle", "zorblax castle castle castle"):
        assert "xl-castle" not in names(retriever.search(prompt, limit=None))


def test_other_family_found_by_its_own_pipeline(catalog):
    xl = tiny.build_tiny_sdxl_pipeline(seed=0)
    r = Retriever(catalog, TextEncoder(xl))
    found = r.search("zorblax castle", limit=None)
    assert names(found) == ["xl-castle"]


def test_fused_selection_top_k_duplicates_and_weights(retriever):
    chosen = retriever.select("a dragon drawn as an ink sketch, monochrome", top_k=3)
    got = names(chosen)
    assert "file-1" in got and ("ink" in got) != ("ink-v2" in got)  # one of the near-duplicate pair
    by = {m.name: m for m in chosen}
    assert by["file-1"].weight == 1.0  # no preferred weight in its file: a bare tag's weight
    if "ink" in by:
        assert by["ink"].weight == 0.6
    assert all(m.claim.score >= retriever.thresholds[m.claim.kind] for m in chosen)
    assert by["file-1"].span == "dragon" and by["file-1"].claim.kind == "weights"
    assert len(retriever.select("a dragon drawn as an ink sketch, monochrome", top_k=1)) == 1
    assert retriever.select("a dragon", top_k=3, min_score=1.01) == []


def test_vector_index_path_matches_exact_ranking(retriever):
    """The same catalog through the on-disk vector index (threshold 0) ranks and scores as the exact scan,
    and selects the same adapters."""
    exact = retriever.search("a robot in a forest", limit=5)
    chosen = [m.name for m in retriever.select("a dragon drawn as an ink sketch, monochrome", top_k=3)]
    retriever.exact_rows, retriever._version = 0, None
    try:
        fast = retriever.search("a robot in a forest", limit=5)
        assert retriever.index is not None
        picked = [m.name for m in retriever.select("a dragon drawn as an ink sketch, monochrome", top_k=3)]
    finally:
        retriever.exact_rows, retriever._version = 20_000, None
    assert names(fast) == names(exact)
    assert [m.score for m in fast] == pytest.approx([m.score for m in exact], abs=1e-5)
    assert picked == chosen


def test_pipeline_loras_auto_chooses_and_says_why(pipe, library, catalog):
    from lora_composer.pipeline import ComposerPipeline

    cp = ComposerPipeline(copy.deepcopy(pipe), library=library)
    images = cp(
        "a dragon, monochrome ink sketch",
        loras="auto",
        top_k=2,
        num_inference_steps=1,
        seed=1,
        height=32,
        width=32,
        progress=False,
    )
    got = {m.name for m in cp.last_retrieval}
    assert images and "file-1" in got and len(got & {"ink", "ink-v2"}) == 1
    assert len(cp.last_retrieval) == 2 and all(m.reason for m in cp.last_retrieval)
    applied = {lo["name"]: lo["unet_weight"] for lo in cp.last_record.loras}
    assert set(applied) == {m.name for m in cp.last_retrieval} and applied["file-1"] == 1.0
    assert "xl-castle" not in applied
    cp("a bowl of soup", loras="auto", num_inference_steps=1, seed=1, height=32, width=32, progress=False)
    assert cp.last_record.loras == [] and cp.last_retrieval == []


def test_cli_index_search_and_loras_auto(tmp_path, monkeypatch, capsys, pipe):
    from lora_composer.frontends.cli import main

    monkeypatch.setenv("LORA_COMPOSER_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"  # the LoRAs below are made for this tiny pipeline, not the default model
    pipe.save_pretrained(str(model))
    lib = tmp_path / "lib"
    write_lora(
        pipe,
        tiny.random_lora_layers(pipe, rank=2, seed=5, text_encoder=False),
        lib / "pix.safetensors",
        sidecar={"trainedWords": ["pixel art"], "description": "8-bit pixel art"},
    )
    write_lora(pipe, tiny.random_lora_layers(pipe, rank=2, seed=6, text_encoder=False), lib / "plain.safetensors")
    (lib / "bad.safetensors").write_bytes(b"not a lora")
    assert main(["index", str(lib), "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 new" in out and "1 skipped" in out and "skipped bad.safetensors:" in out
    assert (lib / ".lora-composer" / "catalog.sqlite").is_file()
    assert main(["search", "a castle in pixel art", "--library", str(lib), "--model", str(model), "-q"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["#", "name", "kind", "score"] and lines[2].split()[1:3] == ["pix", "LoRA"]
    assert "pixel art" in lines[2] and "--loras auto would use: pix:1" in out
    assert '  pix: covers "pixel art" (trigger "pixel art", 1.00)' in out
    png = tmp_path / "auto.png"
    code = main(
        [
            "--prompt",
            "a castle in pixel art",
            "--loras",
            "auto",
            "--top-k",
            "1",
            "--library",
            str(lib),
            "--model",
            str(model),
            "--steps",
            "1",
            "--seed",
            "3",
            "--out",
            str(png),
            "-q",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and png.is_file(), err
    assert 'auto LoRAs: pix 1 (score 1.00: covers "pixel art" (trigger "pixel art"' in out and "LoRAs: pix 1" in out
    # the cap drops a named concept: one clean line on stderr, no Python warning
    code = main(
        [
            "--prompt",
            "a plain castle in pixel art",
            "--loras",
            "auto",
            "--top-k",
            "1",
            "--library",
            str(lib),
            "--model",
            str(model),
            "--steps",
            "1",
            "--seed",
            "3",
            "--out",
            str(png),
        ]
    )
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "cap of" in line]
    assert code == 0 and notes == [
        'compose: note: --loras auto: the cap of 1 LoRA(s) left out plain ("plain"); raise --top-k to use them'
    ], err
    assert "Warning" not in err and "auto LoRAs: pix 1" in out
    assert (
        main(["--prompt", "x", "--loras", "auto", "--lora", "pix", "--library", str(lib), "--model", str(model), "-q"])
        == 2
    )
    assert "leave out --lora" in capsys.readouterr().err
