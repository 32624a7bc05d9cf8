"""Learned (AutoLoRA-style) weight encoder on adapters whose meaning is known by construction: each
concept adapter's cross-attention key/value deltas read its concept word's state (as in
``test_retriever.py``). Trained on the described ones, it must place held-out undescribed ones near their
concept's prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_composer import tiny
from lora_composer.retriever import Catalog, Retriever
from lora_composer.retriever.encoder import TextEncoder
from lora_composer.retriever.signals import learned
from tests.test_retriever import _identity_preserving, concept_direction, concept_layers, write_lora

WORDS = (
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
)
HELD_OUT = 6  # the last ones: undescribed


@pytest.fixture(scope="module")
def pipe():
    return _identity_preserving(tiny.build_tiny_sd15_pipeline(seed=0))


@pytest.fixture(scope="module")
def encoder(pipe):
    return TextEncoder(pipe)


@pytest.fixture(scope="module")
def library(tmp_path_factory, pipe, encoder):
    root = tmp_path_factory.mktemp("learned-lib")
    for i, word in enumerate(WORDS):
        side = {"trainedWords": [word], "description": f"{word} LoRA"} if i < len(WORDS) - HELD_OUT else None
        write_lora(
            pipe,
            concept_layers(pipe, concept_direction(encoder, word), seed=200 + i),
            root / f"a{i:02d}.safetensors",
            sidecar=side,
        )
    return root


def _ranks(z: np.ndarray, t: np.ndarray) -> list[int]:
    """Rank (0 = first) of the right adapter for each prompt vector, by |cos|."""
    sims = np.abs(t @ z.T)  # [prompts, adapters]
    return [int((sims[i] > sims[i, i]).sum()) for i in range(len(t))]


def test_training_lowers_infonce_and_places_held_out_adapters(library, encoder):
    from lora_composer.adapters import load_adapter

    d = int(encoder.mean.shape[-1])
    feats = [learned.features(load_adapter(library / f"a{i:02d}.safetensors"), d) for i in range(len(WORDS))]
    assert all(f is not None and f.shape[1] == d for f in feats)
    texts = [encoder.encode_one(f"{w} LoRA").vector for w in WORDS]
    n_train = len(WORDS) - HELD_OUT
    model, history = learned.train(feats[:n_train], torch.stack(texts[:n_train]), epochs=60)
    assert history[-1] < 0.8 * history[0], history[::10]
    enc = learned.LearnedEncoder(model, encoder.id, "learned:test")
    z = np.stack(enc.embed(feats[n_train:]))
    prompts = np.stack([encoder.encode_one(f"a {w} on a hill at night").vector.numpy() for w in WORDS[n_train:]])
    ranks = _ranks(z, prompts)
    # chance: mean rank (HELD_OUT - 1) / 2 = 2.5 and a top-1 rate of 1/6
    assert np.mean(ranks) < 0.6 * (HELD_OUT - 1) / 2 and sum(r == 0 for r in ranks) >= HELD_OUT // 2, ranks


def test_train_for_library_saves_model_and_search_uses_it(library, encoder, tmp_path):
    with Catalog.for_library(library) as cat:
        cat.index(progress=False)
        cat.encoder_mean(encoder)
        path, info = learned.train_for_library(cat, library, encoder, epochs=20)
        assert path == library / ".lora-composer" / learned.FILE_NAME and path.is_file()
        assert info["adapters"] == len(WORDS) - HELD_OUT and info["loss_after"] < info["loss_before"]
        model = learned.load_for(cat, library, encoder)
        assert model is not None and model.id.startswith("learned:")
        assert learned.load_for(cat, tmp_path, encoder) is None  # no model in that folder
        r = Retriever(cat, encoder, learned=model)
        held = len(WORDS) - HELD_OUT  # an undescribed adapter: no lexical or text signal
        prompt = f"a {WORDS[held]} on a hill at night"
        found = r.search(prompt, limit=3, signals=["learned"])
        names = [m.name for m in found]  # top 3 of 16 (chance: 3/16)
        assert "learned" in r.blocks and f"a{held:02d}" in names, [(m.name, m.score) for m in found]
        assert all("learned weight embedding" in m.reason for m in found)
        fused = r.search(prompt, limit=3)
        assert fused[0].name == f"a{held:02d}" and "learned" in fused[0].signals


def test_cli_train_retriever_writes_the_model_and_search_uses_it(tmp_path, monkeypatch, capsys, pipe):
    from lora_composer.frontends.cli import main

    monkeypatch.setenv("LORA_COMPOSER_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"  # the LoRAs below are made for this tiny pipeline, not the default model
    pipe.save_pretrained(str(model))
    lib = tmp_path / "lib"
    for i, (word, desc) in enumerate(
        [
            ("pixel art", "8-bit pixel art"),
            ("ink sketch", "black ink on paper"),
            ("neon", "glowing neon signs"),
            (None, None),
        ]
    ):
        side = {"trainedWords": [word], "description": desc} if word else None
        write_lora(
            pipe,
            tiny.random_lora_layers(pipe, rank=2, seed=70 + i, text_encoder=False),
            lib / f"l{i}.safetensors",
            sidecar=side,
        )
    assert main(["train-retriever", str(lib), "--model", str(model), "--epochs", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "on 3 described sd15 adapter(s), 3 epochs" in out and "embedded 4 adapter(s)" in out
    assert (lib / ".lora-composer" / learned.FILE_NAME).is_file()
    assert "LORA_COMPOSER_LEARNED=1" in out
    assert (
        main(["search", "glowing neon signs", "--library", str(lib), "--model", str(model), "-q", "--limit", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "lea=" not in out, out  # opt-in: at chance on unseen adapters, so not in the default fused score
    monkeypatch.setenv("LORA_COMPOSER_LEARNED", "1")
    assert (
        main(["search", "glowing neon signs", "--library", str(lib), "--model", str(model), "-q", "--limit", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "lea=" in out, out  # the learned signal is in the table
    assert main(["train-retriever", str(lib), "--model", str(model), "--epochs", "0"]) == 2


def test_untrained_library_has_no_learned_block(library, encoder, tmp_path):
    with Catalog(tmp_path / "c.sqlite", root=library) as cat:
        cat.index(library, progress=False)
        assert learned.load_for(cat, tmp_path, encoder) is None
        r = Retriever(cat, encoder, learned=None)
        r.refresh()
        assert "learned" not in r.blocks
