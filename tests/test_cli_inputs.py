"""``compose`` checks what it is given: each bad input is one line naming the flag, exit code 2 (130 for
Ctrl-C), and nothing is written: no PNG, no partial file, no heatmap."""

from __future__ import annotations

import argparse
import socket
import time

import pytest
import torch

from lora_composer.frontends import args as args_module
from lora_composer.frontends import cli
from lora_composer.frontends.args import Parser
from lora_composer.frontends.cli import COMMANDS, main


pytestmark = pytest.mark.usefixtures("home")


@pytest.fixture(scope="module")
def _loaded():
    return {}


@pytest.fixture(autouse=True)
def one_load(_loaded, monkeypatch):
    """Each model is loaded once for the module (the checks under test run before or around the load)."""
    real = cli.load_pipeline

    def load(model, library=None, **kw):
        key = (model, library, tuple(sorted(kw.items())))
        if key not in _loaded:
            _loaded[key] = real(model, library, **kw)
        return _loaded[key]

    monkeypatch.setattr(cli, "load_pipeline", load)


@pytest.fixture
def out_dir(tmp_path):
    """The folder the render writes into: a test asserts it stays empty when the render fails."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def _compose(out_dir, *argv, steps="2"):
    out = out_dir / "image.png"
    return main(
        ["--prompt", "a purple star", "--steps", steps, "--seed", "1", "--out", str(out), "-q", "--explain", *argv]
    ), out


def _one_line_error(capsys, code, *fragments, exit_code=2):
    err = capsys.readouterr().err
    assert code == exit_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _nothing_written(out_dir):
    assert sorted(p.name for p in out_dir.iterdir()) == []


# -- sizes ---------------------------------------------------------------------------------------


def test_size_must_be_the_models_multiple(out_dir, capsys):
    # the mini world: diffusers' Stable Diffusion pipelines take multiples of 8 (72 renders 72 wide)
    code, _ = _compose(out_dir, "--width", "70")
    _one_line_error(capsys, code, "compose: error: --width 70: must be a multiple of 8 for this model (64 or 72)")
    code, _ = _compose(out_dir, "--height", "4")
    _one_line_error(capsys, code, "--height 4: must be a multiple of 8 for this model (8 or more)")
    code, _ = _compose(out_dir, "--width", "0")
    _one_line_error(capsys, code, "--width 0: must be a positive number of pixels")
    _nothing_written(out_dir)


def test_pixel_step_budget_refuses_at_once_and_names_the_override(out_dir, capsys, monkeypatch):
    steps = _interrupt_at_step(monkeypatch, at=0)  # counts the denoising steps, interrupts none
    code, _ = _compose(out_dir, "--width", "4096", "--height", "4096", steps="20")
    line = _one_line_error(
        capsys,
        code,
        "4096x4096 at 20 steps is 102x this model's budget of 256x256 at 50 steps",
        "pass --no-limits to render anyway",
    )
    assert "limits=False" not in line
    assert steps == []  # refused before rendering (that render takes over ten minutes)
    code, _ = _compose(out_dir, steps="1000")  # steps count too: 64x64 at 1000 steps
    _one_line_error(capsys, code, "64x64 at 1000 steps is 1.3x this model's budget", "--no-limits")
    _nothing_written(out_dir)


def _interrupt_at_step(monkeypatch, at: int = 1):
    """Ctrl-C at the ``at``-th scheduler step of the pipeline ``compose`` loads; returns the step count."""
    steps = []
    real_load = cli.load_pipeline

    def load(*a, **k):
        pipe = real_load(*a, **k)
        real_step = pipe.pipe.scheduler.step

        def step(*sa, **sk):
            steps.append(1)
            if len(steps) == at:
                raise KeyboardInterrupt
            return real_step(*sa, **sk)

        monkeypatch.setattr(pipe.pipe.scheduler, "step", step)
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", load)
    return steps


def test_no_limits_lifts_the_budget(out_dir, capsys, monkeypatch):
    steps = _interrupt_at_step(monkeypatch)  # the render starts (no need to wait 1000 steps)
    code, _ = _compose(out_dir, "--no-limits", steps="1000")
    _one_line_error(capsys, code, "compose: interrupted", exit_code=130)
    assert len(steps) == 1
    _nothing_written(out_dir)


# -- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_stops_within_one_step_and_writes_nothing(out_dir, capsys, monkeypatch):
    steps = _interrupt_at_step(monkeypatch, at=2)
    code, _ = _compose(out_dir, "--lora", "star-shape", steps="20")
    _one_line_error(capsys, code, "compose: interrupted", exit_code=130)
    assert len(steps) == 2  # no step ran after the one interrupted
    _nothing_written(out_dir)


def test_ctrl_c_while_writing_leaves_no_partial_png(out_dir, capsys, monkeypatch):
    import lora_composer.pnginfo as pnginfo

    written = []

    def half_written(image, path, record):
        path.write_bytes(b"\x89PNG\r\n\x1a\n half")
        written.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(pnginfo, "save_png", half_written)
    code, out = _compose(out_dir, steps="1")
    _one_line_error(capsys, code, "compose: interrupted", exit_code=130)
    assert written and written[0] != out and written[0].parent == out_dir  # a temporary name, beside the PNG
    _nothing_written(out_dir)


def test_the_png_appears_whole(out_dir, capsys):
    code, out = _compose(out_dir, "--lora", "star-shape", steps="1")
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out_dir.iterdir()) == ["image.explain.png", "image.png"]  # no temporary left


# -- non-finite output ---------------------------------------------------------------------------


def test_non_finite_output_is_an_error_naming_the_weight(out_dir, capsys):
    code, _ = _compose(out_dir, "--lora", "star-shape:1e9", "--lora", "purple-colour:0.8")
    _one_line_error(
        capsys,
        code,
        "non-finite values (NaN/inf) at step 1 of 2, no image produced",
        "the LoRA weights are the likely cause (the largest: star-shape at 1e+09",
    )
    _nothing_written(out_dir)


# -- missing file, unknown name, unreachable Hub, unclosed tag, pickle -----------------------------


def test_missing_path_and_unknown_name_are_told_apart(out_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _ = _compose(out_dir, "--lora", "./nowhere.safetensors:0.5")
    line = _one_line_error(capsys, code, "compose: error: --lora ./nowhere.safetensors: file not found")
    assert "unknown LoRA" not in line and "available" not in line
    code, _ = _compose(out_dir, "--lora", str(tmp_path / "gone" / "x.safetensors"))
    _one_line_error(capsys, code, f"--lora {tmp_path / 'gone' / 'x.safetensors'}: file not found")
    code, _ = _compose(out_dir, "--lora", "star-shap.safetensors")  # not a file, not in the library either
    _one_line_error(
        capsys,
        code,
        "--lora star-shap.safetensors: file not found, and no LoRA of that name in",
        "did you mean: star-shape",
    )
    code, _ = _compose(out_dir, "--lora", "star-shap")
    line = _one_line_error(capsys, code, "compose: error: unknown LoRA 'star-shap' in", "did you mean: star-shape")
    assert "file not found" not in line
    _nothing_written(out_dir)


def _no_hub_download(monkeypatch):
    import diffusers

    def refuse(*a, **k):
        raise AssertionError("the loader was reached: the Hub check did not fail fast")

    monkeypatch.setattr(diffusers.AutoPipelineForText2Image, "from_pretrained", refuse)


def test_unreachable_hub_fails_fast(out_dir, capsys, monkeypatch):
    tried = []

    def unreachable(address, timeout=None, *a, **k):
        tried.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    _no_hub_download(monkeypatch)
    started = time.perf_counter()
    code, _ = _compose(out_dir, "--model", "lora-composer-tests/no-such-model")
    _one_line_error(
        capsys,
        code,
        "model lora-composer-tests/no-such-model: neither a local folder nor reachable "
        "on the Hugging Face Hub (huggingface.co: Network is unreachable)",
    )
    assert time.perf_counter() - started < 20  # (a busy machine; the loader is never reached)
    assert tried and tried[0][1] == args_module.HUB_TIMEOUT_S <= 5
    _nothing_written(out_dir)


def test_offline_hub_id_fails_without_the_network(out_dir, capsys, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("HF_HUB_OFFLINE is set: nothing may connect")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    _no_hub_download(monkeypatch)
    code, _ = _compose(out_dir, "--model", "lora-composer-tests/no-such-model")
    _one_line_error(
        capsys,
        code,
        "model lora-composer-tests/no-such-model: neither a local folder nor in the "
        "Hugging Face cache, and HF_HUB_OFFLINE is set",
    )
    _nothing_written(out_dir)


def test_unclosed_prompt_tag_is_an_error(out_dir, capsys):
    code, _ = _compose(out_dir, "--prompt", "a purple <lora:star-shape")
    _one_line_error(capsys, code, "unclosed tag '<lora:star-shape' in the prompt: end it with '>'")
    _nothing_written(out_dir)


def test_pickle_refusal_names_the_flag(out_dir, capsys, tmp_path):
    pickled = tmp_path / "old.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    code, _ = _compose(out_dir, "--lora", str(pickled))
    line = _one_line_error(capsys, code, str(pickled), "refusing to read a .pt file", "unless --allow-pickle")
    assert "allow_pickle=True" not in line
    _nothing_written(out_dir)


def test_flag_words():
    assert cli.as_flags("width=72: x; height=-8: y") == "--width 72: x; --height -8: y"
    assert cli.as_flags("unless allow_pickle=True is passed; pass limits=False") == (
        "unless --allow-pickle is passed; pass --no-limits"
    )
    assert cli.as_flags("bandwidth=3") == "bandwidth=3"


# -- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, *COMMANDS], ids=["compose", *COMMANDS])
def test_help_is_plain_and_complete(name, capsys, monkeypatch):
    parsers = []
    real = Parser.format_help

    def record(self):
        parsers.append(self)
        return real(self)

    monkeypatch.setattr(Parser, "format_help", record)
    assert main([name, "--help"] if name else ["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: compose{' ' + name if name else ''} ")
    assert "``" not in text and not any(f":{role}:`" in text for role in ("class", "data", "func", "meth", "mod"))
    (parser,) = parsers
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), (
            action.option_strings or action.dest
        )
    # and on the page: every option line is followed by its text, on the line or indented below it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  -"):
            inline = len(line.strip().split("  ")) > 1
            below = i + 1 < len(lines) and lines[i + 1].startswith(" " * 8) and lines[i + 1].strip()
            assert inline or below, line
    if name is None:  # the subcommands, one per line
        for sub, (help_, _) in COMMANDS.items():
            assert any(line.strip().startswith(f"compose {sub} ") and line.strip().endswith(help_) for line in lines), (
                sub
            )
        # the strategies, each with what it measured (one line per name, wrapped lines indented)
        from lora_composer.fusion.registry import AUTO, AUTO_HELP, STRATEGIES

        block = text.split("by what each measured on the mini world")[1].split("\n", 1)[1]
        entries: dict[str, list[str]] = {}  # name -> its words (a line "  NAME  TEXT", wrapped lines indented)
        for line in block.splitlines():
            if line.startswith("  ") and not line.startswith("   ") and line.split():
                entries[line.split()[0]] = line.split()[1:]
            elif line.strip() and entries:
                entries[list(entries)[-1]] += line.split()
        assert sorted(entries) == sorted([AUTO, *STRATEGIES])  # auto, then one entry per strategy, each its name
        assert entries.pop(AUTO) == AUTO_HELP.split()
        for strategy, cls in STRATEGIES.items():
            assert cls.measured, f"{strategy} says nothing about what it measured"
            assert entries[strategy] == cls.measured.split(), strategy


# -- device and precision ------------------------------------------------------------------------


def test_a_device_this_machine_lacks_is_one_line(out_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _ = _compose(out_dir, "--device", "cuda")
    _one_line_error(capsys, code, "cuda", "no CUDA device")
    code, _ = _compose(out_dir, "--device", "tpu9")
    _one_line_error(capsys, code, "tpu9", "not a device")
    code, _ = _compose(out_dir, "--dtype", "fp8")
    _one_line_error(capsys, code, "--dtype", "fp8")
    _nothing_written(out_dir)


def test_device_and_dtype_follow_the_machine_and_the_model(tmp_path, monkeypatch):
    import json

    from lora_composer.devices import device_and_dtype
    from lora_composer.errors import ComposerError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_and_dtype("auto", "auto", "runwayml/stable-diffusion-v1-5") == ("cpu", torch.float32)
    assert device_and_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)  # asked for: given, even on the CPU
    with pytest.raises(ComposerError, match="no CUDA device"):
        device_and_dtype("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert device_and_dtype("auto", "auto", "stabilityai/stable-diffusion-xl-base-1.0") == ("cuda", torch.float16)
    assert device_and_dtype("auto", "auto", str(flux)) == ("cuda", torch.bfloat16)  # a DiT: bf16, not fp16
    assert device_and_dtype("auto", "auto", "black-forest-labs/FLUX.1-dev") == ("cuda", torch.bfloat16)
    assert device_and_dtype("auto", "fp32", str(flux)) == ("cuda", torch.float32)


def test_the_default_device_renders_on_this_machine(out_dir, capsys):
    code, out = _compose(out_dir, "--device", "cpu", "--dtype", "fp32")
    assert code == 0 and out.is_file(), capsys.readouterr().err


# -- numbers that slip through ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_guidance_must_be_finite(out_dir, capsys, value, monkeypatch):
    loads = []
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loads.append(1))  # refused before any load
    code, _ = _compose(out_dir, "--guidance", value)
    _one_line_error(capsys, code, f"compose: error: --guidance {value}: must be a finite number")
    assert loads == []
    _nothing_written(out_dir)


def test_seed_beyond_the_generators_range_is_one_line(out_dir, capsys):
    code, _ = _compose(out_dir, "--seed", "99999999999999999999999")
    _one_line_error(capsys, code, "--seed 99999999999999999999999: must be between 0 and 18446744073709551615")
    code, _ = _compose(out_dir, "--seed", "-2")  # -1 means random (A1111, the web UI); other negatives are wrong
    _one_line_error(capsys, code, "--seed -2: must be between 0 and", "(or -1: random)")
    _nothing_written(out_dir)


@pytest.mark.parametrize("flag, size", [("--width", (64, 128)), ("--height", (128, 64))])
def test_one_side_given_keeps_it_and_the_other_is_the_models(out_dir, capsys, flag, size):
    from PIL import Image

    code, out = _compose(out_dir, flag, "128")
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert (image.height, image.width) == size  # the mini world's native side is 64


def test_a_torchvision_that_does_not_fit_torch_is_named_in_one_line(tmp_path):
    """A torchvision built for another torch breaks transformers' and peft's imports (80 lines ending in
    ``BloomPreTrainedModel``): compose names the mismatch and the install that fixes it, exit 2, no file."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(tmp_path / "site")}
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_composer", "--prompt", "a star", "--steps", "1", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("compose: error: torchvision ") and "operator torchvision::nms" in errors[0]
    assert "pip install" in errors[0] and "torchvision==0." in errors[0]
    assert not out.exists()
