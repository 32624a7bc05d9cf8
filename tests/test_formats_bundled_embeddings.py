"""A1111 bundled embeddings (``bundle_emb.NAME.string_to_param.*``, SDXL's ``clip_l`` / ``clip_g``) in a LoRA file
load as textual inversions, render like the same embedding loaded with diffusers' ``load_textual_inversion``,
and are removed exactly when the LoRA is unloaded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_composer.adapters import load_adapter
from lora_composer.adapters.embeddings import attach_embeddings, detach_embeddings
from lora_composer.errors import AdapterLoadError, ComposerError

LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np")


def _lora(width=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{LAYER}.lora_down.weight": torch.randn(2, width, generator=gen),
        f"{LAYER}.lora_up.weight": torch.randn(32, 2, generator=gen),
        f"{LAYER}.alpha": torch.tensor(2.0),
    }


def _render(pipe, prompt):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL).images


def _vocab_state(pipe, enc="text_encoder", tok="tokenizer"):
    return len(getattr(pipe, tok)), getattr(pipe, enc).get_input_embeddings().weight.detach().clone()


def test_sd15_bundled_embedding_renders_like_textual_inversion_and_unloads_exactly(sd15_pipe, tmp_path):
    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 3
    path = tmp_path / "with-emb.safetensors"
    save_file({**_lora(), "bundle_emb.zorbl.string_to_param.*": vec}, str(path))
    adapter = load_adapter(path)
    assert set(adapter.embeddings) == {"zorbl"} and torch.equal(adapter.embeddings["zorbl"]["text_encoder"], vec)
    assert len(adapter.deltas) == 1

    ref = copy.deepcopy(sd15_pipe)
    ref.load_textual_inversion(vec, token="zorbl")  # diffusers' own loader: the reference
    n0, table0 = _vocab_state(sd15_pipe)
    plain = _render(sd15_pipe, "a zorbl on a table")
    added = attach_embeddings(sd15_pipe, adapter.embeddings, str(path))
    assert added == {"text_encoder": ["zorbl", "zorbl_1"]}
    got = _render(sd15_pipe, "a zorbl on a table")
    np.testing.assert_array_equal(got, _render(ref, "a zorbl on a table"))
    assert np.abs(got - plain).max() > 1e-3  # the embedding acts
    ids = sd15_pipe.tokenizer("a zorbl").input_ids
    assert sd15_pipe.tokenizer.convert_tokens_to_ids("zorbl") in ids

    detach_embeddings(sd15_pipe, added)
    n1, table1 = _vocab_state(sd15_pipe)
    assert n1 == n0 and torch.equal(table1, table0)
    assert "zorbl" not in sd15_pipe.tokenizer.get_vocab()
    np.testing.assert_array_equal(_render(sd15_pipe, "a zorbl on a table"), plain)


def test_sdxl_bundled_embedding_goes_to_both_text_encoders(sdxl_pipe, tmp_path):
    w1 = sdxl_pipe.text_encoder.get_input_embeddings().weight.shape[1]
    w2 = sdxl_pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    gen = torch.Generator().manual_seed(2)
    clip_l, clip_g = torch.randn(1, w1, generator=gen), torch.randn(1, w2, generator=gen)
    path = tmp_path / "xl.safetensors"
    save_file({"bundle_emb.qux.clip_l": clip_l, "bundle_emb.qux.clip_g": clip_g}, str(path))
    adapter = load_adapter(path)
    ref = copy.deepcopy(sdxl_pipe)
    ref.load_textual_inversion(clip_l, token="qux", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(clip_g, token="qux", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    before = (_vocab_state(sdxl_pipe), _vocab_state(sdxl_pipe, "text_encoder_2", "tokenizer_2"))
    added = attach_embeddings(sdxl_pipe, adapter.embeddings, str(path))
    assert added == {"text_encoder": ["qux"], "text_encoder_2": ["qux"]}
    np.testing.assert_array_equal(_render(sdxl_pipe, "a qux"), _render(ref, "a qux"))
    detach_embeddings(sdxl_pipe, added)
    after = (_vocab_state(sdxl_pipe), _vocab_state(sdxl_pipe, "text_encoder_2", "tokenizer_2"))
    for (n0, t0), (n1, t1) in zip(before, after):
        assert n0 == n1 and torch.equal(t0, t1)


def test_bad_bundled_embeddings_are_refused_in_one_line(tmp_path, sd15_pipe):
    path = tmp_path / "bad.safetensors"
    save_file({**_lora(), "bundle_emb.x.weird": torch.zeros(1, 32)}, str(path))
    with pytest.raises(AdapterLoadError, match="bundle_emb.x.weird"):
        load_adapter(path)
    save_file({**_lora(), "bundle_emb.x.string_to_param.*": torch.full((1, 32), float("nan"))}, str(path))
    with pytest.raises(AdapterLoadError, match="NaN"):
        load_adapter(path)
    save_file({**_lora(), "bundle_emb.wide.string_to_param.*": torch.zeros(1, 48)}, str(path))
    adapter = load_adapter(path)
    n0, table0 = _vocab_state(sd15_pipe)
    with pytest.raises(ComposerError, match="48 wide") as info:
        attach_embeddings(sd15_pipe, {**{"ok": {"text_encoder": torch.ones(1, 32)}}, **adapter.embeddings}, str(path))
    assert "\n" not in str(info.value)
    n1, table1 = _vocab_state(sd15_pipe)  # nothing half-loaded: the good one is gone again
    assert n1 == n0 and torch.equal(table1, table0)


def test_the_pipeline_loads_and_unloads_bundled_embeddings_with_the_lora(sd15_pipe, tmp_path):
    """``ComposerPipeline.load_lora`` adds a file's bundled embedding to the tokenizer; unloading the LoRA (alone or
    with every other) removes it exactly; a file whose embedding cannot load leaves nothing attached."""
    from lora_composer.pipeline import ComposerPipeline

    vec = torch.randn(1, 32, generator=torch.Generator().manual_seed(7))
    path = tmp_path / "with-emb.safetensors"
    save_file({**_lora(), "bundle_emb.zorbl.string_to_param.*": vec}, str(path))
    composer = ComposerPipeline(sd15_pipe)
    n0, table0 = _vocab_state(sd15_pipe)
    adapter = composer.load_lora(path)
    assert "zorbl" in sd15_pipe.tokenizer.get_vocab() and adapter.name in composer.adapters
    composer.unload_lora(adapter.name)
    n1, table1 = _vocab_state(sd15_pipe)
    assert n1 == n0 and torch.equal(table1, table0) and not composer.adapters
    composer.load_lora(path)
    composer.unload_all()
    assert len(sd15_pipe.tokenizer) == n0 and "zorbl" not in sd15_pipe.tokenizer.get_vocab()
    wrong = tmp_path / "wrong-width.safetensors"  # a 48-wide vector for a 32-wide text encoder
    save_file({**_lora(), "bundle_emb.zorbl.string_to_param.*": torch.randn(1, 48)}, str(wrong))
    with pytest.raises(ComposerError):
        composer.load_lora(wrong)
    assert not composer.adapters and len(sd15_pipe.tokenizer) == n0
