"""``ComposerPipeline.__call__`` runs its own loop through the render core (``lora_composer.render``), never the
diffusers pipeline's ``__call__``, and gives the pipeline's image: checked against the diffusers pipeline called
directly with the same LoRAs loaded by diffusers (``load_lora_weights`` / PEFT), on the tiny SD1.5, SDXL,
FLUX.1 and SD3 pipelines."""

import contextlib
import copy

import numpy as np
import pytest
import torch

from lora_composer import tiny_dit
from lora_composer.pipeline import ComposerPipeline
from lora_composer.render import render_for

PROMPT = "a red circle"
UNET = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64)
DIT = dict(num_inference_steps=2, height=16, width=16, max_sequence_length=16)
GUIDANCE = {"flux": 3.5, "sd3": 5.0}


@pytest.fixture(scope="module")
def dit_templates(one_thread):
    return {"flux": tiny_dit.build_tiny_flux_pipeline(seed=0), "sd3": tiny_dit.build_tiny_sd3_pipeline(seed=0)}


@pytest.fixture(params=["sd15", "sdxl", "flux", "sd3"])
def case(request, make_lora, tmp_path):
    """``(pipe, {name: LoRA file}, call keyword arguments)`` for one family."""
    family = request.param
    if family in ("sd15", "sdxl"):
        pipe = request.getfixturevalue(f"{family}_pipe")
        files = {
            "a": make_lora(pipe, "a", rank=4, alpha=8, seed=1, conv=family == "sd15"),
            "b": make_lora(pipe, "b", rank=4, alpha=2, seed=2),
        }
        return family, pipe, files, dict(UNET)
    request.getfixturevalue("one_thread")
    pipe = copy.deepcopy(request.getfixturevalue("dit_templates")[family])
    encoders = ("text_encoder",) if family == "flux" else ("text_encoder", "text_encoder_2")
    files = {}
    for i, (name, alpha) in enumerate((("a", 8), ("b", 4))):
        layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=i + 1, text_encoders=encoders)
        files[name] = tiny_dit.save_dit_diffusers_lora(
            pipe, layers, tmp_path / f"{name}.safetensors", rank=4, alpha=alpha
        )
    return family, pipe, files, dict(DIT, guidance_scale=GUIDANCE[family])


def diffusers_reference(pipe, files, weights, **call):
    """The diffusers pipeline's own call, its LoRAs loaded by diffusers (PEFT) on a copy of ``pipe``."""
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    if files:
        ref.set_adapters(list(files), list(weights))
    ref.set_progress_bar_config(disable=True)
    return ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call).images


@contextlib.contextmanager
def pipeline_call_refused(pipe):
    """The diffusers pipeline class's ``__call__`` raises while active."""
    cls = type(pipe)

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.__call__ was entered")

    original = cls.__call__
    cls.__call__ = refuse
    try:
        yield
    finally:
        cls.__call__ = original


def test_call_runs_the_core_and_matches_diffusers(case):
    """Two images per prompt and a negative prompt, the pipeline's own loop never entered."""
    family, pipe, files, call = case
    call.update(num_images_per_prompt=2, negative_prompt="blurry", output_type="np")
    weights = [0.7, 0.3]
    expected = diffusers_reference(pipe, files, weights, **call)
    base = diffusers_reference(pipe, {}, [], **call)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    assert composer.render_core({"output_type": "np"}) is not None
    with pipeline_call_refused(pipe):
        got = composer(PROMPT, loras=list(zip(files.values(), weights)), seed=0, progress=False, **call)
    assert got.shape == expected.shape and got.shape[0] == 2
    assert np.abs(expected - base).max() > 1e-2  # the LoRAs change the image: the comparison means something
    assert np.abs(got - expected).max() < 1e-4
    assert composer.last_driver.calls == call["num_inference_steps"]


def test_pil_output_and_record_through_the_core(sd15_pipe, make_lora):
    path = make_lora(sd15_pipe, "a", rank=4, seed=1)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    with pipeline_call_refused(sd15_pipe):
        images = composer(PROMPT, loras=[(path, 0.6)], seed=3, progress=False, **UNET)
    assert images[0].size == (64, 64) and "<lora:a:0.6>" in images[0].info["parameters"]
    assert composer.last_record.width == 64 and composer.last_record.seed == 3
    expected = diffusers_reference(sd15_pipe, {"a": path}, [0.6], **UNET, output_type="np")
    got = composer(PROMPT, loras=[(path, 0.6)], seed=0, progress=False, output_type="np", **UNET)
    assert np.abs(got - expected).max() < 1e-4


def test_swapped_scheduler_and_callback(sd15_pipe, make_lora):
    """A scheduler the user put on the pipeline and a step callback that edits the latents, as diffusers does
    them."""
    from diffusers import EulerDiscreteScheduler

    path = make_lora(sd15_pipe, "a", rank=4, seed=1)
    pipe = copy.deepcopy(sd15_pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t), tuple(kwargs)))
        return {"latents": kwargs["latents"] * 0.9}

    call = dict(UNET, output_type="np", callback_on_step_end=callback)
    expected = diffusers_reference(pipe, {"a": path}, [0.8], **call)
    reference_seen, seen[:] = list(seen), []
    plain = diffusers_reference(sd15_pipe, {"a": path}, [0.8], **UNET, output_type="np")
    composer = ComposerPipeline(copy.deepcopy(pipe))
    with pipeline_call_refused(pipe):
        got = composer(PROMPT, loras=[(path, 0.8)], seed=0, progress=False, **call)
    assert seen == reference_seen and len(seen) == 3 and seen[0][2] == ("latents",)
    assert np.abs(got - plain).max() > 1e-2  # scheduler and callback change the image
    assert np.abs(got - expected).max() < 1e-4
    assert composer.last_record.scheduler == "EulerDiscreteScheduler"


def test_clip_skip_as_diffusers(sdxl_pipe, make_lora):
    """SDXL's ``clip_skip`` through the core. (SD1.5's ``encode_prompt`` reads ``text_model.final_layer_norm``,
    which transformers 5's ``CLIPTextModel`` no longer has: diffusers itself fails there.)"""
    path = make_lora(sdxl_pipe, "a", rank=4, seed=1)
    call = dict(UNET, clip_skip=1, output_type="np")
    expected = diffusers_reference(sdxl_pipe, {"a": path}, [0.8], **call)
    plain = diffusers_reference(sdxl_pipe, {"a": path}, [0.8], **UNET, output_type="np")
    composer = ComposerPipeline(copy.deepcopy(sdxl_pipe))
    with pipeline_call_refused(sdxl_pipe):
        got = composer(PROMPT, loras=[(path, 0.8)], seed=0, progress=False, **call)
    assert np.abs(got - plain).max() > 1e-3 and np.abs(got - expected).max() < 1e-4


def test_nan_check_runs_in_the_core(sd15_pipe, make_lora):
    from lora_composer.errors import ComposerError

    path = make_lora(sd15_pipe, "a", rank=4, seed=1)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    with pipeline_call_refused(sd15_pipe), pytest.raises(ComposerError, match="non-finite values .* at step 1 of 3"):
        composer(PROMPT, loras=[(path, 1e20)], seed=0, progress=False, output_type="np", **UNET)


def test_progress_bar_follows_the_flag(sd15_pipe, capsys):
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    composer(PROMPT, seed=0, progress=True, output_type="np", **UNET)
    assert "denoising" in capsys.readouterr().err
    composer(PROMPT, seed=0, progress=False, output_type="np", **UNET)
    assert "denoising" not in capsys.readouterr().err


def test_what_the_core_does_not_cover_goes_to_diffusers(sd15_pipe, dit_templates):
    """Arguments outside the core (here SD's ``guidance_rescale``, FLUX's true CFG, Kontext's input image) run
    the pipeline's own ``__call__``; an argument at the pipeline's default stays in the core."""
    from diffusers import FluxKontextPipeline

    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    assert composer.render_core({"guidance_rescale": 0.0, "output_type": "pil"}) is not None
    assert composer.render_core({"guidance_rescale": 0.7}) is None
    assert composer.render_core({"output_type": "latent"}) is None
    assert composer.render_core({"callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}) is None
    entered = []
    cls = type(composer.pipe)
    original = cls.__call__

    def spy(self, *args, **kwargs):
        entered.append(kwargs.get("guidance_rescale"))
        return original(self, *args, **kwargs)

    cls.__call__ = spy
    try:
        composer(PROMPT, seed=0, progress=False, output_type="np", guidance_rescale=0.7, **UNET)
        composer(PROMPT, seed=0, progress=False, output_type="np", **UNET)
    finally:
        cls.__call__ = original
    assert entered == [0.7]

    flux = ComposerPipeline(copy.deepcopy(dit_templates["flux"]))
    assert flux.render_core({"max_sequence_length": 16}) is not None
    assert flux.render_core({"true_cfg_scale": 2.0}) is None
    kontext = ComposerPipeline(FluxKontextPipeline(**dit_templates["flux"].components))
    assert kontext.render_core({"max_area": 256}) is not None
    assert kontext.render_core({"image": torch.zeros(1, 3, 16, 16), "max_area": 256}) is None
    assert render_for(kontext.pipe) is not None


def test_kontext_without_an_image_matches_diffusers(dit_templates, tmp_path):
    from diffusers import FluxKontextPipeline

    flux = dit_templates["flux"]
    kontext = FluxKontextPipeline(**copy.deepcopy(flux).components)
    path = tiny_dit.save_dit_diffusers_lora(
        kontext, tiny_dit.random_dit_lora_layers(kontext, rank=4, seed=1), tmp_path / "a.safetensors", rank=4, alpha=8
    )
    call = dict(DIT, guidance_scale=2.5, output_type="np", max_area=16 * 16)
    expected = diffusers_reference(kontext, {"a": path}, [0.8], **call)
    composer = ComposerPipeline(copy.deepcopy(kontext))
    with pipeline_call_refused(kontext):
        got = composer(PROMPT, loras=[(path, 0.8)], seed=0, progress=False, **call)
    assert got.shape == (1, 16, 16, 3) and np.abs(got - expected).max() < 1e-4
