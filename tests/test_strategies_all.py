"""Every registered strategy runs end to end on SD1.5- and SDXL-shaped pipelines, in Python and from the CLI."""

import copy

import numpy as np
import pytest

import lora_composer.fusion
from lora_composer.cli import main
from lora_composer.pipeline import ComposerPipeline

CALL = dict(num_inference_steps=3, height=64, width=64, output_type="np", progress=False)


@pytest.mark.parametrize("name", lora_composer.fusion.available())
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_strategy_runs_on_both_families(request, make_lora, name, family):
    pipe = request.getfixturevalue(f"{family}_pipe")
    files = [make_lora(pipe, n, rank=4, seed=i + 1) for i, n in enumerate("ab")]
    composer = ComposerPipeline(copy.deepcopy(pipe))
    base = composer("a red circle", seed=0, **CALL)
    got = composer("a red circle", loras=[(files[0], 0.8), (files[1], 0.6)], strategy=name, seed=0, **CALL)
    assert np.isfinite(got).all()
    assert np.abs(got - base).max() > 1e-3  # the adapters acted
    assert composer.last_record.strategy == name
    assert len(composer.last_driver.history) == CALL["num_inference_steps"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One cache folder for all CLI runs of this module (on the default model), no library from the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_COMPOSER_HOME", str(tmp_path_factory.mktemp("home")))
        mp.delenv("LORA_COMPOSER_LIBRARY", raising=False)
        yield


@pytest.mark.parametrize("name", lora_composer.fusion.available())
def test_strategy_from_cli(home, tmp_path, capsys, name):
    out = tmp_path / f"{name}.png"
    code = main([
        "--prompt", "a red star in pixel style", "--lora", "star-shape:0.8", "--lora", "pixel-style:0.6", "--strategy", name,
        "--steps", "2", "--seed", "1", "--out", str(out), "--explain", "-q",
    ])
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and out.with_name(f"{name}.explain.png").is_file()
