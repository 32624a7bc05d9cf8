"""The default model (the mini world, shipped in the package) and the ``compose`` command, run in-process."""

from __future__ import annotations

import socket

import pytest
from PIL import Image, ImageChops

from lora_composer.frontends.cli import main
from lora_composer.default_model import ensure_default_model, is_default_model
from lora_composer.errors import ComposerError
from lora_composer.miniworld import assets
from lora_composer.miniworld.library import LORAS
from lora_composer.pnginfo import read_record, read_texts


@pytest.fixture(scope="module")
def default(home):
    return ensure_default_model()


# -- the default model: the mini world --------------------------------------------------------------


def test_default_model_is_the_shipped_mini_world(default, tmp_path, capsys):
    model_dir, library = default
    assert (model_dir, library) == (assets.model_dir(), assets.library_dir())
    assert (model_dir / "model_index.json").is_file() and library.is_dir()
    assert ensure_default_model() == default  # nothing to build, nothing to say
    assert capsys.readouterr() == ("", "")
    files = {p.name for p in library.iterdir() if not p.name.startswith(".")}  # not the retriever's catalog
    expected = {f"{s.name}.safetensors" for s in LORAS}
    expected |= {f"{s.name}.json" for s in LORAS if s.sidecar == "a1111"}
    expected |= {f"{s.name}.civitai.info" for s in LORAS if s.sidecar == "civitai"}
    assert expected <= files and {f for f in files if f.endswith(".safetensors")} == {
        f"{s.name}.safetensors" for s in LORAS
    }
    assert is_default_model("miniworld") and is_default_model(model_dir) and is_default_model(f"{model_dir}/")
    assert not is_default_model(tmp_path) and not is_default_model("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_default_model_loads_offline(default, monkeypatch):
    from lora_composer.pipeline import ComposerPipeline

    def no_network(*a, **k):
        raise AssertionError("the default model reached for the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model_dir, library = default
    pipe = ComposerPipeline.from_pretrained(model_dir, library=library)
    tok = pipe.pipe.tokenizer
    assert tok("a purple star").input_ids[0] == tok.bos_token_id and tok.model_max_length == 77
    assert pipe.pipe.unet.config.sample_size * pipe.pipe.vae_scale_factor == 64  # 64x64 images, 16x16 latents
    image = pipe("a purple star", loras=[("star-shape", 1.0)], num_inference_steps=1, seed=0, progress=False)[0]
    assert image.size == (64, 64)
    assert [lo["name"] for lo in pipe.last_record.loras] == ["star-shape"]


@pytest.mark.parametrize("spec", LORAS, ids=[s.name for s in LORAS])
def test_library_loras_load_with_their_trigger_words(default, spec):
    from lora_composer.adapters import load_adapter

    adapter = load_adapter(default[1] / f"{spec.name}.safetensors")
    meta = adapter.metadata
    assert adapter.name == spec.name and adapter.deltas
    assert meta.source_format == ("kohya" if spec.kohya_keys else "diffusers")
    assert set(spec.triggers) <= set(meta.trigger_words), meta.trigger_words
    assert meta.description == spec.description
    assert meta.file_metadata["ss_output_name"] == spec.name and "ss_tag_frequency" in meta.file_metadata


def test_compose_without_model_uses_the_mini_world_at_guidance_5(default, tmp_path, capsys):
    out = tmp_path / "star.png"
    assert (
        main(["--prompt", "a purple star", "--lora", "star-shape", "--steps", "1", "--seed", "3", "--out", str(out)])
        == 0
    ), capsys.readouterr().err
    assert "using the default model (the mini world" in capsys.readouterr().err
    rec = read_record(out)
    assert rec.guidance_scale == assets.DEFAULT_GUIDANCE == 5.0
    assert is_default_model(rec.model) and rec.width == rec.height == 64
    assert "CFG scale: 5," in read_texts(out)["parameters"]

    named = tmp_path / "named.png"  # --model miniworld is the same model; --guidance still wins
    assert (
        main(
            [
                "--prompt",
                "a purple star",
                "--model",
                "miniworld",
                "--guidance",
                "7",
                "--steps",
                "1",
                "--out",
                str(named),
                "-q",
            ]
        )
        == 0
    ), capsys.readouterr().err
    rec = read_record(named)
    assert rec.guidance_scale == 7.0 and is_default_model(rec.model)


def test_another_model_keeps_guidance_7_5(default, sd15_pipe, tmp_path, capsys):
    model = tmp_path / "tiny"
    sd15_pipe.save_pretrained(str(model))
    out = tmp_path / "other.png"
    assert (
        main(
            [
                "--prompt",
                "a red circle",
                "--model",
                str(model),
                "--steps",
                "1",
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert read_record(out).guidance_scale == 7.5


@pytest.mark.parametrize("model", [[], ["--model", "miniworld"]], ids=["no-model", "named"])
def test_search_defaults_to_the_mini_world_library(default, capsys, model):
    assert main(["search", "a purple star", *model, "-q"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"{len(LORAS)} sd15 adapter(s)")
    chosen = out.split("--loras auto would use: ")[1]
    assert "star-shape:" in chosen and "purple-colour:" in chosen


def test_missing_default_weights_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LORA_COMPOSER_LIBRARY", raising=False)
    monkeypatch.setattr(assets, "WEIGHTS", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    with pytest.raises(ComposerError, match="default model's files are missing"):
        ensure_default_model()
    out = tmp_path / "none.png"
    _assert_one_line_error(
        capsys, main(["--prompt", "a star", "--out", str(out), "-q"]), "files are missing", str(tmp_path / "weights")
    )
    assert not out.exists()


# -- compose -------------------------------------------------------------------------------------


def _render(tmp_path, *extra, name="out.png"):
    out = tmp_path / name
    argv = ["--prompt", "a red circle", "--steps", "2", "--width", "64", "--height", "64", "--out", str(out), *extra]
    return main(argv), out


def test_render_writes_png_with_record(default, tmp_path, capsys):
    code, out = _render(
        tmp_path,
        "--lora",
        "star-shape:0.8",
        "--lora",
        "pixel-style:0.5:1",
        "--seed",
        "7",
        "--negative-prompt",
        "blurry",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = captured.out.strip()
    assert "\n" not in summary and str(out) in summary
    assert "star-shape 0.8" in summary and "pixel-style te 0.5/unet 1" in summary
    assert "using the default model (the mini world" in captured.err

    rec = read_record(out)
    assert (rec.prompt, rec.negative_prompt, rec.seed, rec.steps, rec.width, rec.height) == (
        "a red circle",
        "blurry",
        7,
        2,
        64,
        64,
    )
    assert [(lo["name"], lo["te_weight"], lo["unet_weight"]) for lo in rec.loras] == [
        ("star-shape", 0.8, 0.8),
        ("pixel-style", 0.5, 1.0),
    ]
    from lora_composer.adapters import load_adapter

    hashes = {
        n: load_adapter(default[1] / f"{n}.safetensors").metadata.short_hash for n in ("star-shape", "pixel-style")
    }
    params = read_texts(out)["parameters"]
    assert params.startswith("a red circle <lora:star-shape:0.8> <lora:pixel-style:0.5:1>\nNegative prompt: blurry\n")
    assert f'Lora hashes: "star-shape: {hashes["star-shape"]}, pixel-style: {hashes["pixel-style"]}"' in params
    with Image.open(out) as im:
        assert im.size == (64, 64)


def test_from_image_reproduces_the_image(default, tmp_path, capsys):
    code, first = _render(
        tmp_path, "--prompt", "a red circle <lora:pixel-style:0.7>", "--lora", "star-shape:0.8", "--trigger-words", "-q"
    )
    assert code == 0, capsys.readouterr().err
    again = tmp_path / "again.png"
    assert main(["--from-image", str(first), "--out", str(again), "-q"]) == 0, capsys.readouterr().err
    a, b = read_record(first), read_record(again)
    a.elapsed_s = b.elapsed_s = None
    assert a == b
    with Image.open(first) as x, Image.open(again) as y:
        assert ImageChops.difference(x.convert("RGB"), y.convert("RGB")).getbbox() is None

    # flags override the recorded settings
    other = tmp_path / "other.png"
    assert main(["--from-image", str(first), "--out", str(other), "--seed", "99", "--lora", "pixel-style", "-q"]) == 0
    rec = read_record(other)
    assert rec.seed == 99 and rec.prompt == a.prompt and [lo["name"] for lo in rec.loras] == ["pixel-style"]


def test_default_seed_is_random_and_recorded(default, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--prompt", "a red circle", "--steps", "1", "-q"]) == 0, capsys.readouterr().err
    (out,) = tmp_path.glob("compose-*.png")
    assert out.name == f"compose-{read_record(out).seed}.png"


def test_seed_minus_one_is_random_and_recorded(default, tmp_path, monkeypatch, capsys):
    """-1 is A1111's random seed, as in the web UI: each render draws one and records it (PNG and name)."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["--prompt", "a red circle", "--steps", "1", "--seed", "-1", "-q"]) == 0, capsys.readouterr().err
    outs = sorted(tmp_path.glob("compose-*.png"))
    seeds = [read_record(out).seed for out in outs]
    assert len(outs) == 2 and seeds[0] != seeds[1] and all(0 <= s < 2**32 for s in seeds)
    assert [out.name for out in outs] == [f"compose-{s}.png" for s in seeds]
    # --from-image with --seed -1: the image's settings, a new random seed
    again = tmp_path / "again.png"
    assert main(["--from-image", str(outs[0]), "--seed", "-1", "--out", str(again), "-q"]) == 0
    assert read_record(again).seed not in (-1, seeds[0])
    assert f"seed {read_record(again).seed}," in capsys.readouterr().out


def _assert_one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("compose: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_lora_name(default, tmp_path, capsys):
    code, out = _render(tmp_path, "--lora", "star-shap:0.8", "-q")
    _assert_one_line_error(capsys, code, "unknown LoRA 'star-shap'", "did you mean: star-shape")
    assert not out.exists()


def test_unknown_lora_in_prompt_tag(default, tmp_path, capsys):
    code, _ = _render(tmp_path, "--prompt", "a cat <lora:nope:1>", "-q")
    _assert_one_line_error(capsys, code, "unknown LoRA 'nope'")


def test_corrupt_lora_file(default, tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    code, out = _render(tmp_path, "--lora", f"{bad}:0.5", "-q")
    _assert_one_line_error(capsys, code, str(bad))
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prompt", "x", "--lora", "pixel-style:heavy"], "bad weight 'heavy'"),
        (["--prompt", "x <lora:pixel-style:zz>"], "<lora:pixel-style:zz>"),
        (["--steps", "2"], "--prompt is required"),
        (["--prompt", "x", "--steps", "many"], "--steps"),
        (["--prompt", "x", "--model", "/no/such/model"], "/no/such/model"),
        (["--prompt", "x", "--library", "/no/such/library", "--lora", "ink"], "does not exist"),
        (["--from-image", "/no/such.png"], "no such file"),
    ],
)
def test_usage_errors_are_one_line(default, tmp_path, capsys, argv, fragment):
    _assert_one_line_error(capsys, main([*argv, "-q"]), fragment)


def test_from_image_without_record(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    _assert_one_line_error(capsys, main(["--from-image", str(plain), "-q"]), "no lora-composer metadata")


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "--lora" in capsys.readouterr().out


def test_explain_writes_heatmap_and_strategy_args_are_checked(default, tmp_path, capsys):
    code, _ = _render(tmp_path, "--lora", "star-shape:0.8", "--lora", "pixel-style:0.5", "--explain")
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    heatmap = tmp_path / "out.explain.png"
    with Image.open(heatmap) as im:
        assert im.format == "PNG"
    code, _ = _render(tmp_path, "--lora", "star-shape:0.8", "--strategy-arg", "no_such=1", "-q", name="bad.png")
    _assert_one_line_error(capsys, code, "no_such", "valid:")
    code, _ = _render(tmp_path, "--strategy", "nope", "-q", name="bad.png")
    _assert_one_line_error(capsys, code, "unknown strategy 'nope'", "merge")
    code, _ = _render(tmp_path, "--strategy-arg", "oops", "-q", name="bad.png")
    _assert_one_line_error(capsys, code, "KEY=VALUE")
