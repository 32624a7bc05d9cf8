"""The default demo model and the ``compose`` command, run in-process against a temporary cache."""

from __future__ import annotations

import pytest
from PIL import Image, ImageChops

from composer import default_model
from composer.cli import main
from composer.default_model import ensure_default_model
from composer.pnginfo import read_record, read_texts


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One LORA_COMPOSER_HOME for the module: the demo model is built once."""
    path = tmp_path_factory.mktemp("lora-composer-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_COMPOSER_HOME", str(path))
        mp.delenv("LORA_COMPOSER_LIBRARY", raising=False)
        yield path


@pytest.fixture(scope="module")
def demo(home):
    return ensure_default_model(quiet=True)


# -- default demo model --------------------------------------------------------------------------


def test_default_model_builds_under_home_and_loads_offline(home, demo, monkeypatch):
    from diffusers import StableDiffusionPipeline

    model_dir, library = demo
    assert model_dir.parent == home / "default-tiny-sd15"
    assert sorted(p.name for p in library.iterdir()) == [
        "demo-ink.safetensors", "demo-shapes.civitai.info", "demo-shapes.safetensors",
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    assert pipe.tokenizer("a red circle").input_ids[:2] == [49406, 320]  # the real CLIP vocabulary
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_default_model_is_not_rebuilt(demo, monkeypatch):
    stamp = (demo[0].parent / "build.json").stat().st_mtime_ns

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(default_model.tiny, "build_tiny_sd15_pipeline", no_rebuild)
    assert ensure_default_model() == demo
    assert (demo[0].parent / "build.json").stat().st_mtime_ns == stamp


def test_demo_loras_carry_trigger_words(demo):
    from composer.adapters import load_adapter

    ink = load_adapter(demo[1] / "demo-ink.safetensors")
    shapes = load_adapter(demo[1] / "demo-shapes.safetensors")
    assert ink.metadata.source_format == "kohya" and "ink drawing" in ink.metadata.trigger_words
    assert shapes.metadata.source_format == "diffusers" and "geometric shapes" in shapes.metadata.trigger_words
    assert shapes.metadata.description


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch, capsys):
    def half_build(into, seed=0):
        (into / "tiny-sd15-random").mkdir()
        (into / "tiny-sd15-random" / "model_index.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "_build", half_build)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert "random weights" in capsys.readouterr().err  # the one-line notice


# -- compose -------------------------------------------------------------------------------------


@pytest.fixture
def pipeline_ready():
    pytest.importorskip("composer.pipeline")


def _render(tmp_path, *extra, name="out.png"):
    out = tmp_path / name
    argv = ["--prompt", "a red circle", "--steps", "2", "--width", "64", "--height", "64", "--out", str(out), *extra]
    return main(argv), out


def test_render_writes_png_with_record(demo, pipeline_ready, tmp_path, capsys):
    code, out = _render(tmp_path, "--lora", "demo-shapes:0.8", "--lora", "demo-ink:0.5:1", "--seed", "7",
                        "--negative-prompt", "blurry")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = captured.out.strip()
    assert "\n" not in summary and str(out) in summary
    assert "demo-shapes 0.8" in summary and "demo-ink te 0.5/unet 1" in summary
    assert "using the tiny offline demo model" in captured.err

    rec = read_record(out)
    assert (rec.prompt, rec.negative_prompt, rec.seed, rec.steps, rec.width, rec.height) == (
        "a red circle", "blurry", 7, 2, 64, 64,
    )
    assert [(lo["name"], lo["te_weight"], lo["unet_weight"]) for lo in rec.loras] == [
        ("demo-shapes", 0.8, 0.8), ("demo-ink", 0.5, 1.0),
    ]
    from composer.adapters import load_adapter

    hashes = {n: load_adapter(demo[1] / f"{n}.safetensors").metadata.short_hash for n in ("demo-shapes", "demo-ink")}
    params = read_texts(out)["parameters"]
    assert params.startswith("a red circle <lora:demo-shapes:0.8> <lora:demo-ink:0.5:1>\nNegative prompt: blurry\n")
    assert f'Lora hashes: "demo-shapes: {hashes["demo-shapes"]}, demo-ink: {hashes["demo-ink"]}"' in params
    with Image.open(out) as im:
        assert im.size == (64, 64)


def test_from_image_reproduces_the_image(demo, pipeline_ready, tmp_path, capsys):
    code, first = _render(tmp_path, "--prompt", "a red circle <lora:demo-ink:0.7>", "--lora", "demo-shapes:0.8",
                          "--trigger-words", "-q")
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
    assert main(["--from-image", str(first), "--out", str(other), "--seed", "99", "--lora", "demo-ink", "-q"]) == 0
    rec = read_record(other)
    assert rec.seed == 99 and rec.prompt == a.prompt and [lo["name"] for lo in rec.loras] == ["demo-ink"]


def test_default_seed_is_random_and_recorded(demo, pipeline_ready, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--prompt", "a red circle", "--steps", "1", "-q"]) == 0, capsys.readouterr().err
    (out,) = tmp_path.glob("compose-*.png")
    assert out.name == f"compose-{read_record(out).seed}.png"


def _assert_one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("compose: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_lora_name(demo, pipeline_ready, tmp_path, capsys):
    code, out = _render(tmp_path, "--lora", "demo-shape:0.8", "-q")
    _assert_one_line_error(capsys, code, "unknown LoRA 'demo-shape'", "did you mean: demo-shapes")
    assert not out.exists()


def test_unknown_lora_in_prompt_tag(demo, pipeline_ready, tmp_path, capsys):
    code, _ = _render(tmp_path, "--prompt", "a cat <lora:nope:1>", "-q")
    _assert_one_line_error(capsys, code, "unknown LoRA 'nope'")


def test_corrupt_lora_file(demo, pipeline_ready, tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    code, out = _render(tmp_path, "--lora", f"{bad}:0.5", "-q")
    _assert_one_line_error(capsys, code, str(bad))
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prompt", "x", "--lora", "demo-ink:heavy"], "bad weight 'heavy'"),
        (["--prompt", "x <lora:demo-ink:zz>"], "<lora:demo-ink:zz>"),
        (["--steps", "2"], "--prompt is required"),
        (["--prompt", "x", "--steps", "many"], "--steps"),
        (["--prompt", "x", "--model", "/no/such/model"], "/no/such/model"),
        (["--prompt", "x", "--library", "/no/such/library", "--lora", "ink"], "does not exist"),
        (["--from-image", "/no/such.png"], "no such file"),
    ],
)
def test_usage_errors_are_one_line(demo, tmp_path, capsys, argv, fragment):
    _assert_one_line_error(capsys, main([*argv, "-q"]), fragment)


def test_from_image_without_record(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    _assert_one_line_error(capsys, main(["--from-image", str(plain), "-q"]), "no lora-composer metadata")


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "--lora" in capsys.readouterr().out


def test_explain_writes_heatmap_and_strategy_args_are_checked(demo, pipeline_ready, tmp_path, capsys):
    code, _ = _render(tmp_path, "--lora", "demo-shapes:0.8", "--lora", "demo-ink:0.5", "--explain")
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    heatmap = tmp_path / "out.explain.png"
    with Image.open(heatmap) as im:
        assert im.format == "PNG"
    code, _ = _render(tmp_path, "--lora", "demo-shapes:0.8", "--strategy-arg", "no_such=1", "-q", name="bad.png")
    _assert_one_line_error(capsys, code, "no_such", "valid:")
    code, _ = _render(tmp_path, "--strategy", "nope", "-q", name="bad.png")
    _assert_one_line_error(capsys, code, "unknown strategy 'nope'", "merge")
    code, _ = _render(tmp_path, "--strategy-arg", "oops", "-q", name="bad.png")
    _assert_one_line_error(capsys, code, "KEY=VALUE")
