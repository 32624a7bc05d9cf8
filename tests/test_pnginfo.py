"""Generation records in PNG files: A1111 ``parameters`` text and the ``lora-composer`` JSON chunk."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_composer.errors import ComposerError
from lora_composer.pnginfo import GenerationRecord, read_record, read_texts, sampler_name, save_png


def _record(**extra) -> GenerationRecord:
    fields = dict(
        prompt="a red circle, flat colors",
        negative_prompt="blurry, text",
        steps=20,
        guidance_scale=7.5,
        seed=1234,
        width=64,
        height=64,
        strategy="merge",
        strategy_args={},
        model="/cache/lora-composer/default-tiny-sd15/tiny-sd15-random",
        loras=[
            {
                "name": "demo-shapes",
                "path": "/l/demo-shapes.safetensors",
                "te_weight": 0.8,
                "unet_weight": 0.8,
                "hash": "0123456789ab",
            },
            {
                "name": "demo-ink",
                "path": "/l/demo-ink.safetensors",
                "te_weight": 0.5,
                "unet_weight": 1.0,
                "hash": "ba9876543210",
            },
        ],
        sampler="DDIM",
        scheduler="DDIMScheduler",
        version="lora-composer 0.1.0",
        elapsed_s=0.25,
    )
    fields.update(extra)
    return GenerationRecord(**fields)


def test_a1111_text():
    text = _record().to_a1111()
    assert text == (
        "a red circle, flat colors <lora:demo-shapes:0.8> <lora:demo-ink:0.5:1>\n"
        "Negative prompt: blurry, text\n"
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model: tiny-sd15-random, "
        'Lora hashes: "demo-shapes: 0123456789ab, demo-ink: ba9876543210", Version: lora-composer 0.1.0'
    )


def test_a1111_text_variants():
    rec = _record(
        negative_prompt="",
        loras=[],
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        model_hash="6ce0161689",
        strategy="switch",
        sampler="",
        scheduler="EulerAncestralDiscreteScheduler",
    )
    lines = rec.to_a1111().split("\n")
    assert lines[0] == "a red circle, flat colors"
    assert len(lines) == 2  # no "Negative prompt:" line when there is none, as in A1111
    assert "Sampler: Euler a, " in lines[1]
    assert 'Model hash: 6ce0161689, Model: "stable-diffusion-v1-5/stable-diffusion-v1-5"' not in lines[1]
    assert "Model hash: 6ce0161689, Model: stable-diffusion-v1-5/stable-diffusion-v1-5, " in lines[1]
    assert "Lora strategy: switch" in lines[1]
    assert "Lora hashes" not in lines[1]


def test_tags_already_in_prompt_are_not_repeated():
    rec = _record(prompt="a red circle <lora:demo-shapes:0.8>")
    assert rec.to_a1111().split("\n")[0] == "a red circle <lora:demo-shapes:0.8> <lora:demo-ink:0.5:1>"


def test_sampler_names():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    assert sampler_name(DDIMScheduler()) == "DDIM"
    assert sampler_name(DPMSolverMultistepScheduler) == "DPM++ 2M"
    assert sampler_name("SomethingNewScheduler") == "SomethingNewScheduler"


def test_json_round_trip():
    rec = _record(strategy="composite", strategy_args={"every": 5, "order": ["a", "b"]})
    assert GenerationRecord.from_json(rec.to_json()) == rec
    # unknown keys from a newer version are ignored
    data = rec.to_dict() | {"future_field": 1}
    assert GenerationRecord.from_dict(data) == rec


def test_png_round_trip(tmp_path):
    rec = _record(prompt="un cercle rouge, café ☕")
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    out = save_png(image, tmp_path / "sub" / "x.png", rec)
    assert read_record(out) == rec
    texts = read_texts(out)
    assert texts["parameters"] == rec.to_a1111()
    assert 'Lora hashes: "demo-shapes: 0123456789ab, demo-ink: ba9876543210"' in texts["parameters"]
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.info["parameters"].startswith("un cercle rouge, café ☕ <lora:demo-shapes:0.8>")
        assert im.getpixel((0, 0)) == (200, 10, 10)


def _one_line_error(path) -> str:
    with pytest.raises(ComposerError) as err:
        read_record(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_read_record_errors(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert "no lora-composer metadata" in _one_line_error(plain)

    a1111 = tmp_path / "a1111.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    assert "A1111 parameters only" in _one_line_error(a1111)

    jpeg = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    assert "not a PNG" in _one_line_error(jpeg)

    text = tmp_path / "notes.png"
    text.write_text("hello")
    assert "not a readable PNG" in _one_line_error(text)

    assert "no such file" in _one_line_error(tmp_path / "missing.png")

    damaged = tmp_path / "damaged.png"
    info = PngInfo()
    info.add_text("lora-composer", "{not json")
    Image.new("RGB", (8, 8)).save(damaged, pnginfo=info)
    assert "damaged lora-composer metadata" in _one_line_error(damaged)
