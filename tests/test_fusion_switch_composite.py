"""LoRA Switch and LoRA Composite (Zhong et al. 2024) against independent diffusers/PEFT references."""

import copy

import numpy as np
import pytest
import torch

from lora_composer.errors import ComposerError
from lora_composer.pipeline import ComposerPipeline
from lora_composer.fusion import get_strategy

PROMPT = "a red circle"
STEPS = 4
CALL = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, output_type="np")


def _run(composer, files, weights, **kwargs):
    loras = [(path, w) for path, w in zip(files.values(), weights)]
    return composer(PROMPT, loras=loras, seed=0, progress=False, **{**CALL, **kwargs})


def _with_loras(pipe, files):
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    return ref


def switch_reference(pipe, files, weights, every, order=None):
    """diffusers: the first adapter set before the call, the next step's adapter set in ``callback_on_step_end``."""
    ref = _with_loras(pipe, files)
    names = list(files)
    rotation = [names.index(n) for n in (order or names)]

    def at(step):
        return rotation[(step // every) % len(rotation)]

    def callback(p, step_index, timestep, callback_kwargs):
        i = at(step_index + 1)
        p.set_adapters([names[i]], [weights[i]])
        return {}

    first = at(0)
    ref.set_adapters([names[first]], [weights[first]])
    gen = torch.Generator().manual_seed(0)
    return ref(prompt=PROMPT, generator=gen, callback_on_step_end=callback, **CALL).images


def composite_reference(pipe, files, weights):
    """PEFT adapters; the UNet's forward runs once per adapter alone (``set_adapters``) and averages."""
    ref = _with_loras(pipe, files)
    names = list(files)
    ref.set_adapters(names, weights)  # the prompt is encoded with every adapter active
    unet = ref.unet
    forward = unet.forward
    passes = []

    def averaged(*args, **kwargs):
        outs = []
        for name, w in zip(names, weights):
            unet.set_adapters([name], [w])
            outs.append(forward(*args, **kwargs))
        passes.append(len(outs))
        if isinstance(outs[0], tuple):
            return (sum(o[0] for o in outs) / len(outs), *outs[0][1:])
        outs[0].sample = sum(o.sample for o in outs) / len(outs)
        return outs[0]

    unet.forward = averaged
    images = ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images
    assert passes == [len(names)] * STEPS
    return images


# -- switch -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("every", [1, 2])
def test_switch_matches_diffusers_callback_switching(request, make_lora, family, every):
    pipe = request.getfixturevalue(f"{family}_pipe")
    # Text-encoder layers included: the prompt is encoded with the first adapter alone, as in the reference.
    files = {
        "a": make_lora(pipe, "a", rank=4, alpha=8, seed=1),
        "b": make_lora(pipe, "b", rank=4, alpha=4, seed=2),
    }
    weights = [0.9, 0.6]
    expected = switch_reference(pipe, files, weights, every)

    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = _run(composer, files, weights, strategy="switch", strategy_args={"every": every})
    plans = composer.last_driver.history
    record = composer.last_record
    merged = _run(composer, files, weights)

    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - merged).max() > 1e-3  # switch is not merge: the comparison means something
    assert len(plans) == STEPS and all(p.row_groups == 1 for p in plans)
    turns = [weights[(s // every) % 2] * np.eye(2)[(s // every) % 2] for s in range(STEPS)]
    assert np.allclose([p.weights[0].numpy() for p in plans], turns)
    assert record.strategy_args == {"every": every, "order": None}


def test_switch_order_and_three_adapters(sd15_pipe, make_lora):
    files = {n: make_lora(sd15_pipe, n, rank=4, seed=i + 1, text_encoder=False) for i, n in enumerate("abc")}
    weights = [0.8, 0.5, 1.0]
    expected = switch_reference(sd15_pipe, files, weights, every=1, order=["c", "a", "b"])
    default_order = switch_reference(sd15_pipe, files, weights, every=1)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    got = _run(composer, files, weights, strategy="switch", strategy_args={"every": 1, "order": "c, a,b"})
    assert np.abs(expected - default_order).max() > 1e-3  # the order changes the image
    assert np.abs(got - expected).max() < 1e-4
    assert composer.last_record.strategy_args == {"every": 1, "order": ["c", "a", "b"]}

    # adapters the order leaves out take their turns after the named ones, in their given order
    partial = get_strategy("switch", every=1, order=["c"])
    partial.begin(list("abc"), weights, 3)
    assert [partial.active(s) for s in range(4)] == [2, 0, 1, 2]


def test_switch_default_every_is_five():
    strat = get_strategy("switch")
    strat.begin(["a", "b"], [1.0, 0.5], 12)
    assert strat.describe() == {"every": 5, "order": None}
    assert [strat.active(s) for s in range(12)] == [0] * 5 + [1] * 5 + [0] * 2
    assert strat.plan(7, None).weights.tolist() == [[0.0, 0.5]]


# -- composite ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 5])
def test_composite_matches_sequential_reference(sd15_pipe, make_lora, count):
    names = "abcde"[:count]
    files = {n: make_lora(sd15_pipe, n, rank=4, alpha=4 + i, seed=i + 1, conv=(i == 0)) for i, n in enumerate(names)}
    weights = [1.0, 0.6, 0.8, 0.4, 0.7][:count]
    expected = composite_reference(sd15_pipe, files, weights)

    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    got = _run(composer, files, weights, strategy="composite")
    driver = composer.last_driver
    assert driver.calls == STEPS  # one batched pass per step: every adapter's rows together
    assert driver.rows == STEPS * 2 * count  # CFG's two rows, once per adapter
    assert all(torch.equal(p.weights, torch.diag(torch.tensor(weights))) for p in driver.history)
    merged = _run(composer, files, weights)

    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - merged).max() > 1e-3  # composite is not merge: the comparison means something


def test_composite_matches_sequential_reference_sdxl(sdxl_pipe, make_lora):
    files = {n: make_lora(sdxl_pipe, n, rank=4, seed=i + 1) for i, n in enumerate("ab")}
    weights = [0.9, 0.7]
    expected = composite_reference(sdxl_pipe, files, weights)
    composer = ComposerPipeline(copy.deepcopy(sdxl_pipe))
    got = _run(composer, files, weights, strategy="composite")
    assert composer.last_driver.calls == STEPS
    assert np.abs(got - expected).max() < 1e-4


def test_composite_chunked_equals_unchunked(sd15_pipe, make_lora):
    files = {n: make_lora(sd15_pipe, n, rank=4, seed=i + 1) for i, n in enumerate("abc")}
    weights = [1.0, 0.5, 0.8]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    whole = _run(composer, files, weights, strategy="composite")
    assert composer.last_driver.calls == STEPS
    chunked = _run(composer, files, weights, strategy="composite", max_batch=2)  # one group's rows (CFG pair)
    assert composer.last_driver.calls == STEPS * 3
    assert composer.last_driver.rows == STEPS * 2 * 3
    two_per_pass = _run(composer, files, weights, strategy="composite", max_batch=4)
    assert composer.last_driver.calls == STEPS * 2  # row groups {a, b} then {c}
    assert np.abs(chunked - whole).max() < 1e-4
    assert np.abs(two_per_pass - whole).max() < 1e-4


def test_single_adapter_switch_and_composite_equal_merge(sd15_pipe, make_lora):
    path = make_lora(sd15_pipe, "a", rank=4, seed=3)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    merged = _run(composer, {"a": path}, [0.7])
    base = composer(PROMPT, seed=0, progress=False, **CALL)
    assert np.abs(merged - base).max() > 1e-3
    for strategy in ("switch", "composite"):
        assert np.abs(_run(composer, {"a": path}, [0.7], strategy=strategy) - merged).max() < 1e-5
        # no LoRA at all: the base model
        assert np.abs(composer(PROMPT, seed=0, progress=False, strategy=strategy, **CALL) - base).max() < 1e-6


# -- invalid arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, args, words",
    [
        ("switch", {"every": 0}, "every must be >= 1"),
        ("switch", {"every": -3}, "every must be >= 1"),
        ("switch", {"every": 1.5}, "whole number"),
        ("switch", {"every": "often"}, "whole number"),
        ("switch", {"every": True}, "whole number"),
        ("switch", {"order": 3}, "order must be adapter names"),
        ("switch", {"order": "a,b,a"}, "more than once"),
        ("switch", {"steps": 2}, "no argument steps; valid: every=5, order=None"),
        ("composite", {"every": 2}, "no argument every; valid: none"),
    ],
)
def test_invalid_arguments_are_one_line_errors(name, args, words):
    with pytest.raises(ComposerError) as info:
        get_strategy(name, **args)
    message = str(info.value)
    assert "\n" not in message and words in message and name in message


def test_pipeline_rejects_bad_switch_arguments(sd15_pipe, make_lora):
    files = {n: make_lora(sd15_pipe, n, rank=4, seed=i + 1, text_encoder=False) for i, n in enumerate("ab")}
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    with pytest.raises(ComposerError) as info:
        _run(composer, files, [1.0, 1.0], strategy="switch", strategy_args={"every": 0})
    assert "\n" not in str(info.value) and "every must be >= 1" in str(info.value)
    assert composer.last_driver is None  # rejected before any denoising

    with pytest.raises(ComposerError) as info:
        _run(composer, files, [1.0, 1.0], strategy="switch", strategy_args={"order": "b,zz"})
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and "unknown adapter zz" in message and "adapters: a, b" in message
    assert composer.last_driver is None
    get_strategy("switch", order="zz")  # names are only checked against a generation's adapters
