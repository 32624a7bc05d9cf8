"""ComposerPipeline over FLUX.1 and SD3 (tiny pipelines): merge against diffusers' own LoRA loading, Composite
against a sequential per-adapter reference, fused against unfused, exact restores, every strategy."""

import copy

import numpy as np
import pytest
import torch

from lora_composer import tiny_dit
from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext
from lora_composer.fusion.registry import STRATEGIES
from lora_composer.fusion.registry import available as strategy_names
from lora_composer.pipeline import ComposerPipeline

PROMPT = "a red circle"
STEPS = 2
CALL = dict(num_inference_steps=STEPS, height=16, width=16, output_type="np", max_sequence_length=16)
GUIDANCE = {"flux": 3.5, "sd3": 5.0}  # FLUX.1-dev's distilled guidance (no CFG batch); SD3's CFG
TEXT = {"flux": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}  # what diffusers saves/loads


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny DiT layers run on one thread


@pytest.fixture(scope="module")
def templates(one_thread):
    return {"flux": tiny_dit.build_tiny_flux_pipeline(seed=0), "sd3": tiny_dit.build_tiny_sd3_pipeline(seed=0)}


@pytest.fixture(params=["flux", "sd3"])
def family(request):
    return request.param


@pytest.fixture
def pipe(templates, family):
    return copy.deepcopy(templates[family])


@pytest.fixture
def files(pipe, family, tmp_path):
    """Two random LoRAs (rank 4; alphas 8 and 4) on every transformer Linear a LoRA trains and the CLIP text
    encoders, written by the pipeline class's own ``save_lora_weights``."""
    out = {}
    for i, (name, alpha) in enumerate((("a", 8), ("b", 4))):
        layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=i + 1, text_encoders=TEXT[family])
        path = tmp_path / f"{name}.safetensors"
        out[name] = tiny_dit.save_dit_diffusers_lora(pipe, layers, path, rank=4, alpha=alpha)
    return out


def _call(family, **kwargs):
    return {**CALL, "guidance_scale": GUIDANCE[family], **kwargs}


def _run(composer, files, weights, family, **kwargs):
    loras = [(path, w) for path, w in zip(files.values(), weights)]
    return composer(PROMPT, loras=loras, seed=0, progress=False, **_call(family, **kwargs))


def _reference(pipe, files, weights, family, **kwargs):
    """diffusers: ``load_lora_weights`` of every file, ``set_adapters`` at the weights."""
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(list(files), list(weights))
    return ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **_call(family, **kwargs)).images


def test_merge_matches_diffusers(pipe, files, family):
    weights = [0.7, 0.3]
    expected = _reference(pipe, files, weights, family)
    base = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **_call(family)).images
    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = _run(composer, files, weights, family)
    assert got.shape == (1, 16, 16, 3)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(expected - base).max() > 1e-2  # the LoRAs change the image: the comparison means something
    patched = {k.split(".")[0] for k in composer.runtime.layers}
    assert patched == {"transformer", *TEXT[family]}
    kinds = {k.rsplit(".", 1)[-1] for k in composer.runtime.layers if k.startswith("transformer.")}
    assert {"add_k_proj", "to_add_out", "linear"} <= kinds  # joint attention and the norms' modulation
    if family == "flux":
        assert {"proj_mlp", "proj_out"} <= kinds  # single blocks


def test_switch_matches_diffusers_callback_switching(pipe, files, family):
    """Switch, one adapter per step in turn, against diffusers: the first adapter set before the call (the
    prompt is encoded with it alone), the next step's one set in ``callback_on_step_end``."""
    weights, names = [0.9, 0.6], list(files)
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)

    def callback(p, step_index, timestep, callback_kwargs):
        i = (step_index + 1) % 2
        p.set_adapters([names[i]], [weights[i]])
        return {}

    ref.set_adapters([names[0]], [weights[0]])
    expected = ref(
        prompt=PROMPT, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback, **_call(family)
    ).images
    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = _run(composer, files, weights, family, strategy="switch", strategy_args={"every": 1})
    assert [int(p.weights[0].argmax()) for p in composer.last_driver.history] == [0, 1]
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - _run(composer, files, weights, family)).max() > 1e-3  # not merge


def composite_reference(pipe, files, weights, family, **kwargs):
    """PEFT adapters; the transformer's forward runs once per adapter alone (``set_adapters``) and averages."""
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    names = list(files)
    ref.set_adapters(names, weights)  # the prompt is encoded with every adapter active
    transformer = ref.transformer
    forward = transformer.forward
    passes = []

    def averaged(*args, **kw):
        outs = []
        for name, w in zip(names, weights):
            transformer.set_adapters([name], [w])
            outs.append(forward(*args, **kw))
        passes.append(len(outs))
        if isinstance(outs[0], tuple):
            return (sum(o[0] for o in outs) / len(outs), *outs[0][1:])
        outs[0].sample = sum(o.sample for o in outs) / len(outs)
        return outs[0]

    transformer.forward = averaged
    images = ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **_call(family, **kwargs)).images
    assert passes == [len(names)] * STEPS
    return images


@pytest.mark.parametrize("images", [1, 2])
def test_composite_matches_sequential_reference(pipe, files, family, images):
    # two images and two-token prompts: FLUX's txt_ids are [2, 3] like a 2-row batch, and must not be repeated
    kwargs = dict(num_images_per_prompt=images, max_sequence_length=2 if images == 2 else 16)
    weights = [0.9, 0.6]
    expected = composite_reference(pipe, files, weights, family, **kwargs)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = _run(composer, files, weights, family, strategy="composite", **kwargs)
    merged = _run(composer, files, weights, family, **kwargs)
    assert got.shape == (images, 16, 16, 3)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - merged).max() > 1e-3  # composite is not merge
    driver = composer.last_driver
    assert driver.calls == STEPS  # ... but one batched pass per step
    cfg = 2 if family == "sd3" else 1
    assert driver.rows == STEPS * images * cfg  # the merge call; composite's row count is checked below


def test_composite_runs_row_groups_in_one_pass(pipe, files, family):
    composer = ComposerPipeline(copy.deepcopy(pipe))
    _run(composer, files, [0.9, 0.6], family, strategy="composite")
    cfg = 2 if family == "sd3" else 1
    assert composer.last_driver.calls == STEPS and composer.last_driver.rows == STEPS * 2 * cfg


def test_fused_equals_unfused_and_cycles_restore_bit_exactly(pipe, files, family):
    composer = ComposerPipeline(copy.deepcopy(pipe))
    weights = [0.7, 0.3]
    unfused = _run(composer, files, weights, family)
    fused = _run(composer, files, weights, family, fuse=True)
    assert np.abs(fused - unfused).max() < 1e-5
    runtime = composer.runtime
    modules = {k: layer.module for k, layer in runtime.layers.items()}
    before = {k: m.weight.detach().clone() for k, m in modules.items()}
    runtime.set_weights(unet={"a": 0.7, "b": 0.3}, text={"a": 0.7, "b": 0.3})
    for cycle in range(100):
        runtime.fuse()
        if cycle == 0:
            changed = [k for k, m in modules.items() if not torch.equal(m.weight, before[k])]
            assert len(changed) == len(modules)  # every patched layer took its delta
        runtime.unfuse()
    assert all(torch.equal(m.weight, before[k]) for k, m in modules.items())
    composer.unload_all()
    assert not any(n.startswith("_lora_composer") for n, _ in composer.pipe.transformer.named_buffers())
    base = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **_call(family)).images
    again = composer(PROMPT, seed=0, progress=False, **_call(family))
    assert np.array_equal(base, again)


def test_strategy_context(pipe, family):
    context = StrategyContext.from_pipeline(pipe, None, [], guidance_scale=GUIDANCE[family])
    if family == "flux":  # distilled guidance: no CFG batch; the transformer sees timestep / 1000
        assert context.cfg is False and context.num_train_timesteps == 1
    else:
        assert context.cfg is True and context.num_train_timesteps == 1000
        assert StrategyContext.from_pipeline(pipe, None, [], guidance_scale=1.0).cfg is False


# regional runs on UNets only (its refusal on a DiT: tests/test_fusion_regional.py)
@pytest.mark.parametrize("strategy", [s for s in strategy_names() if not STRATEGIES[s].regional])
def test_every_strategy_renders(home, pipe, files, family, strategy):
    composer = ComposerPipeline(copy.deepcopy(pipe))
    if STRATEGIES[strategy].fitted:  # fitted on SD1.5-shaped UNets only: refused in one line, nothing left attached
        with pytest.raises(ComposerError, match="fits UNet pipelines"):
            _run(composer, files, [0.8, 0.5], family, strategy=strategy)
        assert not composer.runtime.fused
        return
    got = _run(composer, files, [0.8, 0.5], family, strategy=strategy)
    assert got.shape == (1, 16, 16, 3) and np.isfinite(got).all()
    assert len(composer.last_driver.history) == STEPS
    assert not composer.runtime.fused and set(composer.runtime.adapters) == {"a", "b"}


def test_default_guidance_is_the_pipelines(pipe, family):
    composer = ComposerPipeline(pipe)
    assert composer.default_guidance == {"flux": 3.5, "sd3": 7.0}[family]
