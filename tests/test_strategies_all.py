"""Every registered strategy runs end to end on SD1.5- and SDXL-shaped pipelines, in Python and from the CLI."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_composer.fusion
from lora_composer.errors import ComposerError
from lora_composer.frontends.cli import main
from lora_composer.fusion.base import Region
from lora_composer.pipeline import ComposerPipeline

CALL = dict(num_inference_steps=3, height=64, width=64, output_type="np", progress=False)


@pytest.mark.parametrize("name", lora_composer.fusion.available())
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_strategy_runs_on_both_families(request, make_lora, name, family, tmp_path, monkeypatch):
    pipe = request.getfixturevalue(f"{family}_pipe")
    files = [make_lora(pipe, n, rank=4, seed=i + 1) for i, n in enumerate("ab")]
    composer = ComposerPipeline(copy.deepcopy(pipe))
    base = composer("a red circle", seed=0, **CALL)
    prompt = "a red circle BREAK a red circle" if name == "regional" else "a red circle"  # regions: one per BREAK part
    loras = [(files[0], 0.8), (files[1], 0.6)]
    if lora_composer.fusion.registry.STRATEGIES[
        name
    ].fitted:  # fitted from each LoRA's trigger words, on SD1.5-shaped UNets
        monkeypatch.setenv("LORA_COMPOSER_FIT_CACHE", str(tmp_path / "fit-cache"))
        for path, word in zip(files, ("red", "circle")):
            Path(path).with_suffix(".civitai.info").write_text(json.dumps({"trainedWords": [word]}))
        if family == "sdxl":
            with pytest.raises(ComposerError, match="fits UNet pipelines with one text encoder"):
                composer(prompt, loras=loras, strategy=name, seed=0, **CALL)
            return
    got = composer(prompt, loras=loras, strategy=name, seed=0, **CALL)
    assert np.isfinite(got).all()
    assert np.abs(got - base).max() > 1e-3  # the adapters acted
    assert composer.last_record.strategy == name
    assert len(composer.last_driver.history) == CALL["num_inference_steps"]


@pytest.mark.parametrize("name", lora_composer.fusion.available())
def test_strategy_from_cli(home, tmp_path, capsys, name):
    out = tmp_path / f"{name}.png"
    code = main(
        [
            "--prompt",
            "a red star BREAK pixel style" if name == "regional" else "a red star in pixel style",
            "--lora",
            "star-shape:0.8",
            "--lora",
            "pixel-style:0.6",
            "--strategy",
            name,
            "--steps",
            "2",
            "--seed",
            "1",
            "--out",
            str(out),
            "--explain",
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and out.with_name(f"{name}.explain.png").is_file()


@pytest.mark.parametrize("name", lora_composer.fusion.available())
def test_strategy_begins_with_a_hand_built_context(name):
    strat = lora_composer.fusion.get_strategy(name)
    embeds = {"positive": torch.zeros(1, 3, 4), "negative": None}
    regions = [Region("a", {"a": 1.0}, embeds), Region("b", {"b": 0.5}, embeds)] if strat.regional else []
    strat.begin(["a", "b"], [1.0, 0.5], 4, lora_composer.fusion.StrategyContext(regions=regions))
    plan = strat.plan(0, 999.0)
    assert plan.row_groups >= 1 and plan.weights.shape[1] == 2
    with pytest.raises(TypeError, match="StrategyContext"):
        strat.begin(["a"], [1.0], 4, {"runtime": None})  # the untyped dict of old


def test_context_from_pipeline(sd15_pipe):
    from lora_composer.runtime import LoraRuntime

    rt = LoraRuntime(sd15_pipe)
    ctx = lora_composer.fusion.StrategyContext.from_pipeline(sd15_pipe, rt, [], guidance_scale=5.0)
    assert ctx.num_train_timesteps == sd15_pipe.scheduler.config.num_train_timesteps
    assert ctx.cfg is True and ctx.runtime is rt and ctx.pipe is sd15_pipe
    assert ctx.layer_groups == rt.layer_groups()
    assert lora_composer.fusion.StrategyContext.from_pipeline(sd15_pipe, rt, [], guidance_scale=1.0).cfg is False


def test_every_strategy_module_is_found_and_a_broken_one_is_named(tmp_path, monkeypatch):
    """Strategies are discovered from the package's modules (no list to forget one in); a module that fails to
    import stops the discovery with its name instead of its strategy silently going missing."""
    import lora_composer.fusion as fusion
    from lora_composer.fusion import registry

    files = {p.stem for p in Path(fusion.__file__).parent.glob("*.py")}
    assert {cls.__module__.rsplit(".", 1)[-1] for cls in registry.STRATEGIES.values()} <= files
    assert registry._discover().keys() == registry.STRATEGIES.keys()
    (tmp_path / "broken_strategy.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.setattr(fusion, "__path__", [*fusion.__path__, str(tmp_path)])
    with pytest.raises(
        ImportError,
        match=r"strategy module lora_composer\.fusion\.broken_strategy fails to import: "
        r"No module named 'no_such_dependency_xyz'",
    ):
        registry._discover()


def test_every_strategy_that_attaches_derived_adapters_shares_one_base():
    """Attach, drive and detach of derived adapters live in one base class: a strategy that rewrites its
    adapters overrides ``build_derived`` only, never ``derived_adapters`` / ``begin`` / ``plan`` for it."""
    from lora_composer.fusion.base import DerivedMerge, Strategy

    derived = {n for n, cls in lora_composer.fusion.registry.STRATEGIES.items() if issubclass(cls, DerivedMerge)}
    assert {"ties", "dare", "tsv", "klora", "activation-matched", "fit"} <= derived
    for name, cls in lora_composer.fusion.registry.STRATEGIES.items():
        if cls.derived_adapters is not Strategy.derived_adapters:
            assert cls.derived_adapters is DerivedMerge.derived_adapters, name
        if issubclass(cls, DerivedMerge):
            assert cls.plan is DerivedMerge.plan and cls.static is DerivedMerge.static, name
            assert cls.suffix != DerivedMerge.suffix, f"{name}: derived adapters need a name of their own"
