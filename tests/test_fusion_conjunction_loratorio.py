"""conjunction (Composable Diffusion's AND) and LoRAtorio against hand-written references.

End to end: the tiny SD1.5 pipeline with the adapters loaded through diffusers/PEFT; the UNet's forward is
replaced by one that runs each adapter alone and the base (PEFT ``set_adapters``) and applies the formula
written here, independently of the strategies' code. The combine math is also checked on synthetic tensors
against direct per-patch numpy loops.
"""

import copy
import math

import numpy as np
import pytest
import torch

from lora_composer.errors import ComposerError
from lora_composer.fusion import StepPlan, StrategyContext, get_strategy
from lora_composer.fusion.loratorio import loratorio_combine, patch_cosine, softmin_map
from lora_composer.fusion.registry import parse_strategy_args
from lora_composer.pipeline import ComposerPipeline

PROMPT = "a red circle"
STEPS = 3
GUIDANCE = 5.0
CALL = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64, output_type="np")


# -- hand-written formulas ----------------------------------------------------------------------------


def conjunction_formula(loras, base, w):
    """e_base + sum_i w_i (e_i - e_base), numpy."""
    return base + sum(wi * (e - base) for wi, e in zip(w, loras))


def loratorio_formula(loras, base, cfg, p, tau, top_k=None, uncond="map", base_uncond=0.5):
    """LoRAtorio written patch by patch with numpy. ``loras``: [N, B, C, H, W], ``base``: [B, C, H, W]."""
    loras, base = np.asarray(loras, np.float64), np.asarray(base, np.float64)
    n, rows, _, h, w = loras.shape
    half = rows // 2 if cfg else 0
    out = np.zeros_like(base)
    for b in range(half, rows):
        patches = [(y, x) for y in range(0, h, p) for x in range(0, w, p)]
        cos = np.zeros((n, len(patches)))
        for k, (y, x) in enumerate(patches):
            ref = base[b, :, y : y + p, x : x + p].ravel()
            for i in range(n):
                e = loras[i, b, :, y : y + p, x : x + p].ravel()
                cos[i, k] = e @ ref / (np.linalg.norm(e) * np.linalg.norm(ref))
        keep = np.ones(n, bool)
        if top_k is not None and top_k < n:
            keep[:] = False
            keep[np.argsort(-(1 - cos).mean(1))[:top_k]] = True
        for k, (y, x) in enumerate(patches):
            z = np.where(keep, np.exp(-cos[:, k] / tau), 0.0)
            m = z / z.sum()
            sl = (slice(None), slice(y, y + p), slice(x, x + p))
            out[b][sl] = sum(m[i] * loras[i, b][sl] for i in range(n))
            if cfg:
                u = b - half
                agg = (
                    sum(m[i] * loras[i, u][sl] for i in range(n))
                    if uncond == "map"
                    else loras[:, u][(slice(None), *sl)].mean(0)
                )
                out[u][sl] = base_uncond * base[u][sl] + (1 - base_uncond) * agg
    return out


# -- synthetic tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3])
def test_patch_cosine_matches_a_loop(p):
    g = torch.Generator().manual_seed(0)
    preds, base = torch.randn(3, 2, 4, 7, 8, generator=g), torch.randn(2, 4, 7, 8, generator=g)
    cos = patch_cosine(preds, base, p).numpy()
    assert cos.shape == (3, 2, math.ceil(7 / p), math.ceil(8 / p))
    for i in range(3):
        for b in range(2):
            for py, y in enumerate(range(0, 7, p)):
                for px, x in enumerate(range(0, 8, p)):
                    e, r = (
                        preds[i, b, :, y : y + p, x : x + p].ravel().numpy(),
                        base[b, :, y : y + p, x : x + p].ravel().numpy(),
                    )
                    assert cos[i, b, py, px] == pytest.approx(e @ r / np.linalg.norm(e) / np.linalg.norm(r), abs=1e-5)


def test_softmin_and_top_k():
    cos = torch.tensor([[[[0.9]]], [[[0.5]]], [[[0.7]]]])  # 3 LoRAs, one image, one patch
    m = softmin_map(cos, 0.1)[:, 0, 0, 0].numpy()
    z = np.exp(-np.array([0.9, 0.5, 0.7]) / 0.1)
    assert np.allclose(m, z / z.sum())
    assert m.argmax() == 1  # the LoRA furthest from the base wins
    top = softmin_map(cos, 0.1, top_k=2)[:, 0, 0, 0].numpy()
    z[0] = 0  # the LoRA closest to the base is dropped
    assert np.allclose(top, z / z.sum())
    assert np.allclose(softmin_map(cos, 1e3)[:, 0, 0, 0].numpy(), 1 / 3, atol=1e-3)  # hot: the mean


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("uncond", ["map", "mean"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_loratorio_combine_matches_the_formula(cfg, uncond, top_k):
    g = torch.Generator().manual_seed(1)
    preds, base = torch.randn(3, 4, 4, 6, 5, generator=g), torch.randn(4, 4, 6, 5, generator=g)
    got, _ = loratorio_combine(preds, base, cfg, patch_size=2, temperature=0.2, top_k=top_k, uncond=uncond)
    want = loratorio_formula(preds.numpy(), base.numpy(), cfg, 2, 0.2, top_k, uncond)
    assert np.allclose(got.numpy(), want, atol=1e-5)


def test_default_combine_is_the_linear_one():
    preds = torch.randn(3, 2, 4)
    plan = StepPlan(torch.eye(3), combine=torch.tensor([0.5, 2.0, -1.5]))
    strat = get_strategy("composite")
    assert torch.allclose(strat.combine(preds, plan), 0.5 * preds[0] + 2 * preds[1] - 1.5 * preds[2])
    assert torch.allclose(strat.combine(preds, StepPlan(torch.eye(3))), preds.mean(0))


def test_conjunction_plan_and_arguments():
    strat = get_strategy("conjunction", **parse_strategy_args("scales=1,0.5"))
    strat.begin(["a", "b"], [0.8, 0.6], 4, StrategyContext())
    plan = strat.plan(0, 999.0)
    assert torch.equal(plan.weights, torch.tensor([[0.8, 0.0], [0.0, 0.6], [0.0, 0.0]]))
    assert torch.allclose(plan.combine, torch.tensor([1.0, 0.5, -0.5]))
    assert strat.describe() == {"scales": [1, 0.5]}
    default = get_strategy("conjunction")
    default.begin(["a", "b", "c"], [1, 1, 1], 4)
    assert torch.allclose(default.plan(0, None).combine, torch.tensor([1.0, 1.0, 1.0, -2.0]))
    with pytest.raises(ValueError, match="3 adapters"):
        strat.begin(["a", "b", "c"], [1, 1, 1], 4)
    with pytest.raises(ComposerError, match="temperature"):
        get_strategy("loratorio", temperature=0)


def test_guidance_of_the_conjunction_is_the_conjunction_of_guided_predictions():
    g = torch.Generator().manual_seed(2)
    preds = torch.randn(4, 2, 4, 8, 8, generator=g)  # 3 LoRAs + base, CFG batch [u, c]
    w = [1.0, 0.7, 1.3]
    guide = lambda e: e[0] + GUIDANCE * (e[1] - e[0])  # noqa: E731  (diffusers' CFG on a [u, c] batch)
    combined = conjunction_formula(preds[:3], preds[3], w)
    assert torch.allclose(
        guide(combined), conjunction_formula([guide(e) for e in preds[:3]], guide(preds[3]), w), atol=1e-5
    )


# -- end to end against PEFT -------------------------------------------------------------------------


def _reference(pipe, files, weights, formula, **call):
    """diffusers + PEFT: the prompt encoded with every adapter; each UNet call runs every adapter alone and
    the base (all at 0), then ``formula(lora outputs, base output)`` is the prediction."""
    ref = copy.deepcopy(pipe)
    names = list(files)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(names, weights)
    unet = ref.unet
    forward = unet.forward

    def composed(*args, **kwargs):
        outs = []
        for i, name in enumerate(names):
            unet.set_adapters(names, [w if j == i else 0.0 for j, w in enumerate(weights)])
            outs.append(
                forward(*args, **kwargs)[0] if not kwargs.get("return_dict", True) else forward(*args, **kwargs).sample
            )
        unet.set_adapters(names, [0.0] * len(names))
        base = forward(*args, **kwargs)
        base_sample = base[0] if isinstance(base, tuple) else base.sample
        mixed = torch.as_tensor(formula(torch.stack(outs).numpy(), base_sample.numpy()), dtype=base_sample.dtype)
        if isinstance(base, tuple):
            return (mixed, *base[1:])
        base.sample = mixed
        return base

    unet.forward = composed
    return ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **{**CALL, **call}).images


def _files(pipe, make_lora, count):
    return {n: make_lora(pipe, n, rank=4, alpha=4 + i, seed=i + 1, conv=(i == 0)) for i, n in enumerate("abc"[:count])}


def _run(composer, files, weights, **kwargs):
    return composer(PROMPT, loras=list(zip(files.values(), weights)), seed=0, progress=False, **{**CALL, **kwargs})


@pytest.mark.parametrize("scales", [None, (1.0, 0.5, 1.5)])
def test_conjunction_matches_the_reference(sd15_pipe, make_lora, scales):
    files = _files(sd15_pipe, make_lora, 3)
    weights = [1.0, 0.6, 0.8]
    w = [1.0] * 3 if scales is None else list(scales)
    expected = _reference(sd15_pipe, files, weights, lambda loras, base: conjunction_formula(loras, base, w))

    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    got = _run(composer, files, weights, strategy="conjunction", strategy_args={"scales": scales})
    driver = composer.last_driver
    assert driver.calls == STEPS and driver.rows == STEPS * 2 * 4  # one pass: CFG's 2 rows x (3 LoRAs + base)
    merged = _run(composer, files, weights)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - merged).max() > 1e-3  # not merge: the comparison means something


@pytest.mark.parametrize(
    "kw",
    [
        dict(patch_size=3, temperature=0.05),
        dict(patch_size=2, temperature=0.2, uncond="mean"),
        dict(patch_size=1, temperature=0.1, top_k=2),
    ],
)
def test_loratorio_matches_the_reference(sd15_pipe, make_lora, kw):
    files = _files(sd15_pipe, make_lora, 3)
    weights = [1.0, 0.6, 0.8]
    p, tau = kw["patch_size"], kw["temperature"]
    expected = _reference(
        sd15_pipe,
        files,
        weights,
        lambda loras, base: loratorio_formula(loras, base, True, p, tau, kw.get("top_k"), kw.get("uncond", "map")),
    )

    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    got = _run(composer, files, weights, strategy="loratorio", strategy_args=kw)
    strat_map = composer.last_driver.strategy.last_map
    assert composer.last_driver.rows == STEPS * 2 * 4
    assert np.abs(got - expected).max() < 1e-4
    assert torch.allclose(strat_map.sum(0), torch.ones(()))
    if kw.get("top_k"):
        assert ((strat_map > 0).flatten(2).any(-1).sum(0) == kw["top_k"]).all()  # per image: k LoRAs take part
    assert composer.last_record.strategy_args["patch_size"] == p


def test_loratorio_without_guidance_weights_every_row(sd15_pipe, make_lora):
    files = _files(sd15_pipe, make_lora, 2)
    weights = [1.0, 0.7]
    expected = _reference(
        sd15_pipe, files, weights, lambda loras, base: loratorio_formula(loras, base, False, 2, 0.1), guidance_scale=1.0
    )
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    got = _run(composer, files, weights, strategy="loratorio", guidance_scale=1.0)
    assert composer.last_driver.rows == STEPS * 1 * 3  # no CFG: one row per group
    assert np.abs(got - expected).max() < 1e-4


def test_strategies_without_adapters_are_the_base(sd15_pipe):
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    base = composer(PROMPT, seed=0, progress=False, **CALL)
    for name in ("conjunction", "loratorio"):
        assert np.abs(composer(PROMPT, strategy=name, seed=0, progress=False, **CALL) - base).max() < 1e-6
