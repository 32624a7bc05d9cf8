"""fit: per-set fitted merge coefficients (ZipLoRA for N LoRAs): one LoRA stays itself, the cosine term
separates the LoRAs' columns, the cache hits and misses when it should, fused equals unfused, bad input is
one line."""

import copy
import json

import numpy as np
import pytest
import torch

from lora_composer.errors import ComposerError
from lora_composer.fusion import fit, fit_cache, get_strategy
from lora_composer.pipeline import ComposerPipeline

CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np", progress=False)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny layers: threads only add contention
FAST = dict(iters=2, sample_steps=1, levels=(0.7,), templates=("{trigger}",), progress=False, lr=0.1)


@pytest.fixture(autouse=True)
def fit_home(tmp_path, monkeypatch):
    """A fit cache and a home of this test's own, nothing remembered from another test."""
    monkeypatch.setenv("LORA_COMPOSER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORA_COMPOSER_FIT_CACHE", str(tmp_path / "fits"))
    fit_cache.clear_memory()
    yield tmp_path / "fits"
    fit_cache.clear_memory()


def _lora(make_lora, pipe, name, seed, trigger: str | None = None):
    path = make_lora(pipe, name, rank=4, seed=seed, conv=True)
    if trigger is not None:
        path.with_name(name + ".civitai.info").write_text(json.dumps({"trainedWords": [trigger]}))
    return path


def _files(make_lora, pipe, n=2):
    words = ["red circle", "blue square", "green triangle"]
    return [_lora(make_lora, pipe, "abc"[i], i + 1, words[i]) for i in range(n)]


def test_one_lora_keeps_its_coefficients_at_one(sd15_pipe, make_lora):
    """Alone, the LoRA is its own teacher: merge (m = 1) is the optimum, and the fit must stay there."""
    (path,) = _files(make_lora, sd15_pipe, 1)
    composer = ComposerPipeline(sd15_pipe)
    merged = composer("a red circle", loras=[(path, 0.9)], strategy="merge", seed=0, **CALL)
    strat = get_strategy("fit", **FAST)
    got = composer("a red circle", loras=[(path, 0.9)], strategy=strat, seed=0, **CALL)
    log = fit.FIT_LOG[-1]
    assert log["merge_match"] == pytest.approx(0.0, abs=1e-6) and log["layers"] > 0
    derived = strat.derived_adapters()["a"]
    for key, d in composer.adapters["a"].deltas.items():
        torch.testing.assert_close(derived.deltas[key].up.float(), d.up.float(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, merged, atol=1e-4)


def test_fit_lowers_the_match_error_and_cosine_term_separates_columns(sd15_pipe, make_lora):
    files = _files(make_lora, sd15_pipe, 2)
    composer = ComposerPipeline(sd15_pipe)
    loras = [(files[0], 1.0), (files[1], 1.0)]
    composer(
        "a red circle", loras=loras, strategy=get_strategy("fit", **{**FAST, "iters": 6, "ortho": 0.0}), seed=0, **CALL
    )
    plain = fit.FIT_LOG[-1]
    assert plain["end"][0] < plain["merge_match"]  # the fit reproduces the teachers better than merge
    strat = get_strategy("fit", **{**FAST, "iters": 6, "ortho": 5.0})
    composer("a red circle", loras=loras, strategy=strat, seed=0, **CALL)
    pushed = fit.FIT_LOG[-1]
    assert pushed["end"][1] < pushed["merge_cos"] - 0.01  # columns further apart than merge's
    assert pushed["end"][1] < plain["end"][1]  # and further apart than without the cosine term
    derived = strat.derived_adapters()
    assert set(derived) == {"a", "b"} and derived["a"].name == "a~fit"
    # what the log reports is what the derived adapters carry: recompute the cosine from their up factors
    key = next(
        k
        for k, d in composer.adapters["a"].deltas.items()
        if k.startswith("unet") and k in composer.adapters["b"].deltas
    )
    rows = []
    for n in "ab":
        orig, new = composer.adapters[n].deltas[key], derived[n].deltas[key]
        ratio = new.up.float().reshape(new.up.shape[0], -1) / orig.up.float().reshape(orig.up.shape[0], -1)
        rows.append(ratio[:, 0])
    assert any(not torch.allclose(r, torch.ones_like(r)) for r in rows)


def test_cache_hits_without_a_fit_and_misses_when_a_file_changes(sd15_pipe, make_lora, fit_home, monkeypatch):
    files = _files(make_lora, sd15_pipe, 2)
    loras = [(files[0], 1.0), (files[1], 0.8)]
    runs = []
    real = fit.fit_coefficients
    monkeypatch.setattr(fit, "fit_coefficients", lambda *a, **k: runs.append(1) or real(*a, **k))
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    strat = get_strategy("fit", **FAST)
    first = composer("a red circle", loras=loras, strategy=strat, seed=0, **CALL)
    assert len(runs) == 1 and strat.cache_hit is False
    assert len(list(fit_home.glob("*.safetensors"))) == 1

    fit_cache.clear_memory()  # a new process: only the disk cache is left
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    strat = get_strategy("fit", **FAST)
    second = composer("a red circle", loras=loras, strategy=strat, seed=0, **CALL)
    assert len(runs) == 1 and strat.cache_hit is True
    np.testing.assert_array_equal(second, first)

    # the same name, other weights in the file: a new fit
    changed = make_lora(sd15_pipe, "b", rank=4, seed=9, conv=True)
    assert changed == files[1]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    composer("a red circle", loras=loras, strategy=get_strategy("fit", **FAST), seed=0, **CALL)
    assert len(runs) == 2 and len(list(fit_home.glob("*.safetensors"))) == 2
    # another fit parameter: a new fit too
    composer("a red circle", loras=loras, strategy=get_strategy("fit", **{**FAST, "ortho": 0.5}), seed=0, **CALL)
    assert len(runs) == 3


def test_fused_render_equals_the_derived_adapters_render(sd15_pipe, make_lora):
    files = _files(make_lora, sd15_pipe, 2)
    composer = ComposerPipeline(sd15_pipe)
    loras = [(files[0], 1.0), (files[1], 0.7)]
    merged = composer("a red circle", loras=loras, strategy="merge", seed=0, **CALL)
    state = {k: v.clone() for k, v in composer.pipe.unet.state_dict().items()}
    plain = composer("a red circle", loras=loras, strategy=get_strategy("fit", **FAST), seed=0, **CALL)
    fused = composer("a red circle", loras=loras, strategy=get_strategy("fit", **FAST), seed=0, fuse=True, **CALL)
    assert np.abs(plain - merged).max() > 1e-4  # the fitted adapters acted, not the originals
    np.testing.assert_allclose(fused, plain, atol=1e-4)
    after = composer.pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())  # base weights restored exactly
    assert list(composer.adapters) == ["a", "b"]


def test_a_lora_without_trigger_words_is_one_line(sd15_pipe, make_lora):
    good = _lora(make_lora, sd15_pipe, "a", 1, "red circle")
    bare = _lora(make_lora, sd15_pipe, "b", 2)
    composer = ComposerPipeline(sd15_pipe)
    with pytest.raises(ComposerError) as err:
        composer("a red circle", loras=[(good, 1.0), (bare, 1.0)], strategy=get_strategy("fit", **FAST), seed=0, **CALL)
    text = str(err.value)
    assert "\n" not in text and "'b'" in text and "trigger words" in text


@pytest.mark.parametrize(
    "args", [{"levels": (0.5, 1.5)}, {"templates": ("no placeholder",)}, {"scope": "vae"}, {"lr": 0}]
)
def test_bad_arguments_are_one_line(args):
    with pytest.raises(ComposerError) as err:
        get_strategy("fit", **args)
    assert "\n" not in str(err.value) and "fit" in str(err.value)


def test_without_a_pipeline_it_is_merge():
    strat = get_strategy("fit")
    strat.begin(["a", "b"], [1.0, 0.5], 4)
    assert strat.derived_adapters() is None and strat.static
    assert strat.plan(0, 999.0).weights.tolist() == [[1.0, 0.5]]
