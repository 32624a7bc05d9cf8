"""ComposerPipeline against diffusers' own LoRA loading (the reference), on tiny SD1.5 and SDXL pipelines."""

import copy

import numpy as np
import pytest
import torch

from lora_composer.errors import ComposerError
from lora_composer.pipeline import ComposerPipeline

CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")


def reference(pipe, files, weights):
    """diffusers ``load_lora_weights`` + ``set_adapters`` on a copy of ``pipe``."""
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(list(files), adapter_weights=weights)
    return ref(prompt="a red circle", generator=torch.Generator().manual_seed(0), **CALL).images


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_merge_matches_diffusers_set_adapters(request, make_lora, family, fmt):
    pipe = request.getfixturevalue(f"{family}_pipe")
    files = {
        "a": make_lora(pipe, "a", fmt=fmt, rank=4, alpha=8, seed=1, conv=(family == "sd15")),
        "b": make_lora(pipe, "b", fmt=fmt, rank=4, alpha=2, seed=2),
    }
    expected = reference(pipe, files, [0.7, 0.3])
    base = copy.deepcopy(pipe)(prompt="a red circle", generator=torch.Generator().manual_seed(0), **CALL).images

    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = composer("a red circle", loras=[(files["a"], 0.7), (files["b"], 0.3)], seed=0, progress=False, **CALL)

    assert np.abs(expected - base).max() > 1e-2  # the LoRAs change the image: the comparison means something
    assert np.abs(got - expected).max() < 1e-4
    assert {"text_encoder"} <= {k.split(".")[0] for k in composer.runtime.layers}  # text-encoder layers included


def test_separate_text_encoder_and_unet_strengths(sd15_pipe, make_lora):
    path = make_lora(sd15_pipe, "a", rank=4, alpha=4, seed=3)
    expected = reference(sd15_pipe, {"a": path}, [{"unet": 0.6, "text_encoder": 0.2}])
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    got = composer("a red circle", loras=[(path, 0.2, 0.6)], seed=0, progress=False, **CALL)
    assert np.abs(got - expected).max() < 1e-4


def test_prompt_tags_resolve_from_library(sd15_pipe, make_lora, tmp_path):
    path = make_lora(sd15_pipe, "ink-style", rank=4, seed=4)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe), library=tmp_path)
    tagged = composer("a red circle <lora:ink-style:0.8>", seed=0, progress=False, **CALL)
    record = composer.last_record
    assert record.prompt == "a red circle"
    assert record.loras[0]["name"] == "ink-style" and record.loras[0]["unet_weight"] == 0.8
    explicit = composer("a red circle", loras=[(path, 0.8)], seed=0, progress=False, **CALL)
    assert np.array_equal(tagged, explicit)
    with pytest.raises(ComposerError, match="nope"):
        composer("a red circle <lora:nope:0.8>", seed=0, progress=False, **CALL)


def test_fused_call_matches_unfused_and_restores(sd15_pipe, make_lora):
    files = [make_lora(sd15_pipe, n, seed=i, conv=True) for i, n in enumerate("ab")]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    loras = [(files[0], 0.7), (files[1], 0.3)]
    unfused = composer("a red circle", loras=loras, seed=0, progress=False, **CALL)
    weights = {k: v.clone() for k, v in composer.pipe.unet.state_dict().items()}
    fused = composer("a red circle", loras=loras, seed=0, fuse=True, progress=False, **CALL)
    assert np.abs(fused - unfused).max() < 1e-5
    assert all(torch.equal(v, weights[k]) for k, v in composer.pipe.unet.state_dict().items())


def test_switching_and_unloading_give_back_the_base(sd15_pipe, make_lora):
    base = copy.deepcopy(sd15_pipe)(prompt="a red circle", generator=torch.Generator().manual_seed(0), **CALL).images
    files = [make_lora(sd15_pipe, n, seed=i) for i, n in enumerate("ab")]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    only_a = composer("a red circle", loras=[(files[0], 1.0)], seed=0, progress=False, **CALL)
    composer("a red circle", loras=[(files[1], 1.0)], seed=0, progress=False, **CALL)
    again_a = composer("a red circle", loras=[(files[0], 1.0)], seed=0, progress=False, **CALL)
    assert np.array_equal(only_a, again_a)  # adapters stay attached; inactive ones change nothing
    assert set(composer.adapters) == {"a", "b"}
    assert np.array_equal(composer("a red circle", seed=0, progress=False, **CALL), base)
    composer.unload_all()
    assert np.array_equal(composer("a red circle", seed=0, progress=False, **CALL), base)


def test_images_carry_generation_parameters(sd15_pipe, make_lora):
    path = make_lora(sd15_pipe, "a", seed=1)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    image = composer("a red circle", loras=[(path, 0.5)], seed=7, num_inference_steps=2, progress=False)[0]
    text = image.info["parameters"]
    assert "<lora:a:0.5>" in text and "Seed: 7" in text and "Lora hashes:" in text
    assert composer.last_record.loras[0]["hash"] == composer.adapters["a"].metadata.sha256[:12]


def test_default_model_is_recorded_by_name_and_renders_at_its_guidance(sd15_pipe):
    """Any front end (CLI, UI, notebook) gets the mini world's name in its PNGs and its guidance by default."""
    from lora_composer.default_model import MODEL_NAME
    from lora_composer.miniworld import assets

    mini = ComposerPipeline.from_pretrained(assets.model_dir(), library=assets.library_dir())
    mini("a red circle", num_inference_steps=1, seed=0, progress=False)
    assert mini.model == MODEL_NAME and mini.last_record.model == MODEL_NAME
    assert mini.last_record.guidance_scale == assets.DEFAULT_GUIDANCE
    mini("a red circle", num_inference_steps=1, seed=0, guidance_scale=2.0, progress=False)
    assert mini.last_record.guidance_scale == 2.0
    other = ComposerPipeline(sd15_pipe, model="some/model")
    assert other.model == "some/model" and other.default_guidance == 7.5


def test_a_very_long_prompt_is_cut_with_a_one_line_note(sd15_pipe):
    """A 5,000-word prompt: the text encoder reads its first 77 tokens, and diffusers' note about the rest is one
    line (it echoes the whole dropped text otherwise: tens of kilobytes)."""
    import io
    import logging

    from lora_composer.pipeline import ComposerPipeline

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # beside diffusers' own handler, which the note passes through too
    logging.getLogger("diffusers").addHandler(handler)
    try:
        ComposerPipeline(sd15_pipe)(
            " ".join(["star"] * 5000),
            num_inference_steps=1,
            seed=0,
            height=64,
            width=64,
            progress=False,
            output_type="np",
        )
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    notes = [line for line in stream.getvalue().splitlines() if "truncated" in line]
    assert len(notes) == 1 and len(notes[0]) < 300, stream.getvalue()[:500]
    assert "up to 77 tokens: the rest of the prompt is dropped (" in notes[0] and "star" not in notes[0]
