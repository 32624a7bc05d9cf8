"""FLUX.1 Kontext and saved DiT model folders: ``ComposerPipeline`` over FluxKontextPipeline against diffusers'
own LoRA loading, and ``compose --model DIR`` loading the class a folder's model_index.json names."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_composer import tiny_dit
from lora_composer.errors import ComposerError
from lora_composer.frontends.cli import main
from lora_composer.pipeline import ComposerPipeline
from lora_composer.pnginfo import read_record

CALL = dict(num_inference_steps=2, height=16, width=16, max_sequence_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny DiT layers run on one thread


@pytest.fixture(scope="module")
def flux(one_thread):
    return tiny_dit.build_tiny_flux_pipeline(seed=0)


@pytest.fixture
def files(flux, tmp_path):
    return {
        n: tiny_dit.save_dit_diffusers_lora(
            flux,
            tiny_dit.random_dit_lora_layers(flux, rank=4, seed=i + 1),
            tmp_path / f"{n}.safetensors",
            rank=4,
            alpha=8,
        )
        for i, n in enumerate("ab")
    }


def test_kontext_merge_matches_diffusers(flux, files):
    from diffusers import FluxKontextPipeline

    kontext = FluxKontextPipeline(**flux.components)
    kontext.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8"))
    # the image as given (no resizing to Kontext's preferred 1024-pixel sizes): 16x16
    call = dict(image=image, max_area=16 * 16, _auto_resize=False, output_type="np", guidance_scale=2.5, **CALL)
    ref = copy.deepcopy(kontext)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(list(files), [0.7, 0.3])
    expected = ref(prompt="make it red", generator=torch.Generator().manual_seed(0), **call).images
    base = kontext(prompt="make it red", generator=torch.Generator().manual_seed(0), **call).images

    composer = ComposerPipeline(copy.deepcopy(kontext))
    loras = [(files["a"], 0.7), (files["b"], 0.3)]
    got = composer("make it red", loras=loras, seed=0, progress=False, **call)
    assert got.shape == (1, 16, 16, 3)
    assert np.abs(got - expected).max() < 1e-4 and np.abs(expected - base).max() > 1e-2
    composite = composer("make it red", loras=loras, seed=0, progress=False, strategy="composite", **call)
    assert np.isfinite(composite).all() and np.abs(composite - got).max() > 1e-3
    assert composer.last_driver.calls == 2 and composer.last_driver.rows == 4  # one pass of both row groups


@pytest.mark.parametrize("kind", ["flux", "kontext", "sd3"])
def test_compose_model_folder_loads_its_class(flux, files, tmp_path, kind, home):
    from diffusers import FluxKontextPipeline

    pipe = {
        "flux": lambda: flux,
        "kontext": lambda: FluxKontextPipeline(**flux.components),
        "sd3": tiny_dit.build_tiny_sd3_pipeline,
    }[kind]()
    model = tmp_path / f"model-{kind}"
    pipe.save_pretrained(model)
    wanted = type(pipe).__name__
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == wanted
    composer = ComposerPipeline.from_pretrained(model)
    assert type(composer.pipe).__name__ == wanted
    assert composer.default_guidance == {"flux": 3.5, "kontext": 3.5, "sd3": 7.0}[kind]

    out = tmp_path / f"{kind}.png"
    lora = [] if kind == "sd3" else ["--lora", f"{files['a']}:0.8"]  # FLUX LoRAs do not fit SD3's layers
    code = main(
        [
            "--model",
            str(model),
            "--prompt",
            "a red circle",
            *lora,
            "--steps",
            "2",
            "--width",
            "16",
            "--height",
            "16",
            "--seed",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code in (0, None) and Image.open(out).size == (16, 16)
    record = read_record(out)
    assert record.guidance_scale == composer.default_guidance and len(record.loras) == len(lora) // 2


def test_unreadable_model_index_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ComposerError, match=r"model_index.json: cannot read the model index") as err:
        ComposerPipeline.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)


def test_true_cfg_runs_merge_and_refuses_per_step_strategies(flux, files):
    """FLUX's true CFG calls the transformer twice per step: merge follows diffusers, per-step strategies are
    refused."""
    call = dict(negative_prompt="blurry", true_cfg_scale=2.0, output_type="np", guidance_scale=3.5, **CALL)
    ref = copy.deepcopy(flux)
    ref.load_lora_weights(str(files["a"]), adapter_name="a")
    ref.set_adapters(["a"], [0.7])
    expected = ref(prompt="a red circle", generator=torch.Generator().manual_seed(0), **call).images
    composer = ComposerPipeline(copy.deepcopy(flux))
    got = composer("a red circle", loras=[(files["a"], 0.7)], seed=0, progress=False, **call)
    assert np.abs(got - expected).max() < 1e-4 and composer.last_driver.calls == 4
    with pytest.raises(ComposerError, match="strategy 'switch' cannot run with true CFG"):
        composer("a red circle", loras=[(files["a"], 0.7)], seed=0, progress=False, strategy="switch", **call)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_loras_auto_picks_by_name_on_dit_pipelines(flux, tmp_path, kind, home):
    """The retriever reads a DiT pipeline's CLIP token states (its prompt embeddings are T5's)."""
    pipe = flux if kind == "flux" else tiny_dit.build_tiny_sd3_pipeline()
    library = tmp_path / "library"
    for i, name in enumerate(("red-style", "zebra-pattern")):
        # SD3's files carry its second CLIP too: what tells them from FLUX's at these toy widths
        encoders = ("text_encoder",) if kind == "flux" else ("text_encoder", "text_encoder_2")
        layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=i + 1, text_encoders=encoders)
        tiny_dit.save_dit_diffusers_lora(pipe, layers, library / f"{name}.safetensors", rank=4)
    composer = ComposerPipeline(copy.deepcopy(pipe), library=library)
    images = composer("a red style circle", loras="auto", seed=0, progress=False, **CALL)
    assert len(images) == 1 and images[0].size == (16, 16)
    assert [m.row.name for m in composer.last_retrieval] == ["red-style"]
    assert [lo["name"] for lo in composer.last_record.loras] == ["red-style"]
    assert composer.adapters["red-style"].family == composer.runtime.family == kind


def test_flux_and_sd3_files_are_told_apart(flux, files, tmp_path):
    from lora_composer.adapters import LayerDelta
    from lora_composer.adapters.family import detect_family

    def delta(width):
        return LayerDelta(torch.zeros(4, width), torch.zeros(width, 4), 4.0)

    assert detect_family({"transformer.transformer_blocks.0.attn.to_q": delta(1536)}) == "sd3"  # SD3 medium
    assert detect_family({"transformer.transformer_blocks.0.attn.to_q": delta(3072)}) == "flux"
    assert detect_family({"transformer.pos_embed.proj": delta(32)}) == "sd3"
    assert detect_family({"transformer.x_embedder": delta(32)}) == "flux"
    sd3 = tiny_dit.build_tiny_sd3_pipeline()
    layers = tiny_dit.random_dit_lora_layers(sd3, rank=4, seed=1, text_encoders=("text_encoder", "text_encoder_2"))
    sd3_file = tiny_dit.save_dit_diffusers_lora(sd3, layers, tmp_path / "sd3-lora.safetensors", rank=4)
    for pipe, path, message in (
        (sd3, files["a"], "a.safetensors: LoRA for flux, but the pipeline is sd3"),
        (flux, sd3_file, "sd3-lora.safetensors: LoRA for sd3, but the pipeline is flux"),
    ):
        composer = ComposerPipeline(copy.deepcopy(pipe))
        with pytest.raises(ComposerError, match=message):
            composer("a red circle", loras=[(path, 1.0)], seed=0, progress=False, **CALL)
        assert not composer.adapters and not composer.runtime.layers
