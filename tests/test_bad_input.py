"""Every kind of bad LoRA input: one-line error naming the file, and the pipeline left exactly as it was."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_composer.errors import ComposerError
from lora_composer.pipeline import ComposerPipeline

CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np", progress=False)


def _rewrite(src, dst, change):
    sd = load_file(str(src))
    change(sd)
    save_file(sd, str(dst))
    return dst


def _last_unet_key(sd, suffix):
    return sorted(k for k in sd if k.startswith("unet.") and k.endswith(suffix))[-1]


def _bad_files(tmp_path, good, sd15_pipe, sdxl_pipe, make_lora):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    pickle_file = tmp_path / "pickled.ckpt"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    not_st = tmp_path / "text.safetensors"
    not_st.write_text("this is not a safetensors file")

    def widen(sd):
        k = _last_unet_key(sd, "lora_A.weight")
        sd[k] = torch.randn(sd[k].shape[0], sd[k].shape[1] + 3)

    def poison(sd):
        k = _last_unet_key(sd, "lora_B.weight")
        sd[k] = sd[k].clone()
        sd[k][0, 0] = float("nan")

    return {
        "truncated": truncated,
        "pickle": pickle_file,
        "not-safetensors": not_st,
        "other-family": make_lora(sdxl_pipe, "xl-lora", seed=5),
        "shape": _rewrite(good, tmp_path / "wide.safetensors", widen),
        "nan": _rewrite(good, tmp_path / "nan.safetensors", poison),
        "unknown-keys": _rewrite(
            good, tmp_path / "odd.safetensors", lambda sd: [sd.update({f"weird.{k}": sd.pop(k)}) for k in list(sd)]
        ),
        "missing": tmp_path / "nowhere.safetensors",
    }


KINDS = ["truncated", "pickle", "not-safetensors", "other-family", "shape", "nan", "unknown-keys", "missing"]


@pytest.fixture
def setup(tmp_path, sd15_pipe, sdxl_pipe, make_lora):
    good = make_lora(sd15_pipe, "good", seed=1)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe), library=tmp_path)
    before = composer("a cat", loras=[(good, 0.8)], seed=0, **CALL)
    return composer, good, before, _bad_files(tmp_path, good, sd15_pipe, sdxl_pipe, make_lora)


def _snapshot(composer):
    unet = composer.pipe.unet
    return (
        {k: v.clone() for k, v in unet.state_dict().items()},
        sum(len(m._forward_hooks) for m in unet.modules()),
        set(composer.adapters),
    )


def test_each_bad_input_is_refused_cleanly(setup):
    composer, good, before, bad = setup
    state = _snapshot(composer)
    for kind in KINDS:
        path = bad[kind]
        with pytest.raises(ComposerError) as err:
            composer("a cat", loras=[(good, 0.8), (path, 0.5)], seed=0, **CALL)
        message = str(err.value)
        assert "\n" not in message, kind
        assert str(path.name) in message, (kind, message)
        after = _snapshot(composer)
        assert after[2] == state[2], kind  # nothing new attached
        assert after[1] == state[1], kind  # no stray hooks
        assert all(torch.equal(after[0][k], v) for k, v in state[0].items()), kind
    assert np.array_equal(composer("a cat", loras=[(good, 0.8)], seed=0, **CALL), before)


def test_unknown_prompt_tag(setup):
    composer, good, before, _ = setup
    with pytest.raises(ComposerError) as err:
        composer("a cat <lora:no-such-lora:0.5>", loras=[(good, 0.8)], seed=0, **CALL)
    assert "no-such-lora" in str(err.value) and "\n" not in str(err.value)
    assert set(composer.adapters) == {"good"}


def test_pickle_needs_explicit_opt_in(setup, monkeypatch):
    composer, good, _, bad = setup
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    with pytest.raises(ComposerError):
        composer("a cat", loras=[(bad["pickle"], 0.5)], seed=0, **CALL)
    assert calls == []  # never unpickled without allow_pickle


def test_non_finite_latents_stop_the_call_and_name_the_weight(setup):
    composer, good, before, _ = setup
    seen = []

    def theirs(pipe, step, timestep, kwargs):  # a caller's own step callback still runs
        seen.append(step)
        return kwargs

    with pytest.raises(ComposerError) as err:
        composer("a cat", loras=[(good, 1e20)], seed=0, callback_on_step_end=theirs, **CALL)
    message = str(err.value)
    assert message.startswith("non-finite values (NaN/inf) at step 1 of 2, no image produced: ")
    assert "the largest: good at 1e+20" in message and "\n" not in message
    assert seen == []  # stopped at the step the NaN appeared
    assert np.array_equal(composer("a cat", loras=[(good, 0.8)], seed=0, callback_on_step_end=theirs, **CALL), before)
    assert seen == [0, 1]


def test_sizes_are_checked_against_the_model(setup):
    composer, good, _, _ = setup
    multiple, native = composer.size_rules()  # the tiny model: VAE 2 (diffusers' SD pipelines: 8); 8x8 latents
    assert (multiple, native) == (8, (16, 16))
    with pytest.raises(ComposerError, match=r"^width=66: must be a multiple of 8 for this model \(64 or 72\)$"):
        composer("a cat", loras=[(good, 0.8)], seed=0, **{**CALL, "width": 66})
    with pytest.raises(ComposerError, match=r"^height=2: must be a multiple of 8 for this model \(8 or more\)$"):
        composer.check_size(2, 64)
    with pytest.raises(ComposerError) as err:  # the budget: 64x64 (4x native per side) at 50 steps
        composer.check_size(64, 64, 51)
    assert str(err.value) == (
        "64x64 at 51 steps is 1.1x this model's budget of 64x64 at 50 steps (4x its native "
        "16x16 per side; larger renders are slow and may run out of memory): pass limits=False "
        "to render anyway"
    )
    with pytest.raises(ComposerError, match=r"^64x64 at 20 steps x 4 images is 1.6x"):
        composer.check_size(64, 64, 20, images=4)
    composer.check_size(64, 64, 50)
    composer.check_size(4096, 4096, 50, limits=False)
    assert set(composer.adapters) == {"good"}


def test_a_lora_for_a_larger_model_of_the_same_kind_says_so(sd15_pipe, tmp_path):
    """A real SD1.5 LoRA (320-wide layers, 768-wide cross-attention) on a small SD1.5-shaped model: one line
    saying what it was made for and the first layer that does not fit, and nothing stays attached."""
    from lora_composer import tiny
    from lora_composer.errors import AdapterMismatchError
    from lora_composer.pipeline import ComposerPipeline

    layers = tiny.random_lora_layers(sd15_pipe, rank=4, seed=3, text_encoder=False)
    wide = {}
    for key, value in layers["unet"].items():
        if key.endswith("lora_A.weight"):  # SD1.5's widths: 768 into cross-attention K/V, 320 elsewhere
            value = torch.randn(value.shape[0], 768 if ".attn2.to_k." in key or ".attn2.to_v." in key else 320)
        wide[f"unet.{key}"] = value
    from safetensors.torch import save_file

    save_file(wide, str(tmp_path / "real-sd15.safetensors"))
    composer = ComposerPipeline(sd15_pipe)
    with pytest.raises(AdapterMismatchError) as info:
        composer.load_lora(tmp_path / "real-sd15.safetensors")
    message = str(info.value)
    assert "\n" not in message and "real-sd15.safetensors: made for SD1.5-sized layers: " in message
    assert (
        "-wide unet." in message and "does not fit this model's" in message and "(a LoRA for another model)" in message
    )
    assert composer.adapters == {}
