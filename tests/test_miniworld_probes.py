"""The mini world's interference probes change exactly what they say, on the shipped model and LoRAs."""

import pytest
import torch

from bench.miniworld import probes
from lora_composer.adapters.shira import dense_delta
from lora_composer.miniworld import assets
from lora_composer.pipeline import ComposerPipeline

PROMPT = "blinky, a purple star on a wavy background"
NAMES = ["star-shape", "purple-colour", "blinky-character"]


@pytest.fixture(scope="module")
def cp():
    pipe = ComposerPipeline.from_pretrained(assets.model_dir(), library=assets.library_dir())
    for name in NAMES:
        pipe.load_lora(name)
    pipe.runtime.set_weights(unet={n: 1.0 for n in NAMES}, text={n: 1.0 for n in NAMES})
    return pipe


def _encode(cp, text_weights):
    cp.runtime.set_weights(text=text_weights)
    return cp.pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]


def test_trigger_positions_find_each_word(cp):
    tok = cp.pipe.tokenizer
    ids = tok(PROMPT).input_ids
    at = probes.trigger_positions(tok, PROMPT, ["purple", "wavy background"])
    assert [tok.decode([ids[p]]).strip() for p in at] == ["purple", "wavy", "background"]


def test_text_splice_takes_each_trigger_from_its_own_lora(cp):
    merged = _encode(cp, {n: 1.0 for n in NAMES})
    own = {n: _encode(cp, {m: float(m == n) for m in NAMES}) for n in NAMES}
    cp.runtime.set_weights(text={n: 1.0 for n in NAMES})
    with probes.text_splice(cp, NAMES):
        got = cp.pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]
    assert "encode_prompt" not in vars(cp.pipe)  # restored
    owned = set()
    for n in NAMES:
        at = probes.trigger_positions(cp.pipe.tokenizer, PROMPT, cp.runtime.adapters[n].metadata.trigger_words)
        assert at and torch.equal(got[0, at], own[n][0, at])
        assert not torch.allclose(own[n][0, at], merged[0, at], atol=1e-4)  # the splice changes something
        owned |= set(at)
    rest = [p for p in range(got.shape[1]) if p not in owned]
    assert torch.equal(got[0, rest], merged[0, rest])


def test_kv_route_keeps_only_the_owners_delta_at_its_tokens(cp):
    rt = cp.runtime
    key = next(k for k in rt.layers if k.endswith("attn2.to_v") and all(k in rt.adapters[n].deltas for n in NAMES))
    module = rt.layers[key].module
    x = torch.randn(2, 77, module.in_features, generator=torch.Generator().manual_seed(0))
    rt.set_weights(unet={n: 1.0 for n in NAMES})
    with torch.no_grad():
        plain = module(x)
        with probes.kv_route(cp, NAMES, PROMPT):
            routed = module(x)
        base = torch.nn.functional.linear(x, module.weight, module.bias)
    deltas = [x @ dense_delta(rt.adapters[n].deltas[key]).T for n in NAMES]
    assert torch.allclose(plain, base + sum(deltas), atol=1e-5)  # merge: every delta everywhere
    assert torch.equal(routed[0], plain[0])  # unconditional half untouched
    for j, n in enumerate(NAMES):
        at = probes.trigger_positions(cp.pipe.tokenizer, PROMPT, rt.adapters[n].metadata.trigger_words)
        assert torch.allclose(routed[1, at], base[1, at] + deltas[j][1, at], atol=1e-5)
    free = [
        p
        for p in range(77)
        if p
        not in set(
            sum(
                (
                    probes.trigger_positions(cp.pipe.tokenizer, PROMPT, rt.adapters[n].metadata.trigger_words)
                    for n in NAMES
                ),
                [],
            )
        )
    ]
    assert torch.equal(routed[1, free], plain[1, free])
    with torch.no_grad():
        assert torch.equal(module(x), plain)  # hooks removed


def test_uncond_factor_scales_the_first_half_of_rows(cp):
    rt = cp.runtime
    rows = torch.ones(4, rt.denoiser_mix.slots)
    with probes.uncond_factor(rt, 0.25):
        rt.set_denoiser_rows(rows)
        got = rt.denoiser_mix.weights.clone()
    assert torch.equal(got[:2], torch.full_like(got[:2], 0.25)) and torch.equal(got[2:], torch.ones_like(got[2:]))
    assert "set_denoiser_rows" not in vars(rt)


def _render(cp, names, strategy="merge", n=None):
    from bench.miniworld.probes import OwnInputs, own_inputs

    loras = [(name, 1.0) for name in names]
    call = dict(num_inference_steps=3, seed=1, progress=False, output_type="np")
    if n is None:
        return cp(PROMPT, loras=loras, **call)
    with own_inputs(cp.runtime, n):
        return cp(PROMPT, loras=loras, strategy=OwnInputs(), **call)


def test_own_inputs_with_one_lora_is_merge_and_with_two_is_not(cp):
    """One LoRA: its solo stream is the composed one, so the picture is merge's; two: each LoRA's delta is
    computed on features the other did not change, which is not merge."""
    one = ["purple-colour"]
    assert abs(_render(cp, one, n=1) - _render(cp, one)).max() < 1e-4
    two = ["purple-colour", "star-shape"]
    merged = _render(cp, two)
    assert abs(_render(cp, two, n=2) - merged).max() > 1e-2
    assert abs(_render(cp, two) - merged).max() == 0  # the hooks are gone


def test_own_inputs_gives_the_composed_rows_each_solo_rows_delta(cp):
    """One layer, three row groups of one row (composed, star alone, purple alone): the composed row gets the
    base output of its own input plus each LoRA's delta on that LoRA's row; the solo rows are left as they are."""
    from bench.miniworld.probes import own_inputs

    rt, two = cp.runtime, NAMES[:2]
    key = next(
        k
        for k in rt.layers
        if k.startswith("unet.") and k.endswith("attn1.to_q") and all(k in rt.adapters[n].deltas for n in two)
    )
    module = rt.layers[key].module
    x = torch.randn(3, 16, module.in_features, generator=torch.Generator().manual_seed(1))
    rows = torch.zeros(3, rt.denoiser_mix.slots)
    rows[1, rt.slots[two[0]]] = rows[2, rt.slots[two[1]]] = 1.0
    rt.set_denoiser_rows(rows)
    with torch.no_grad():
        plain = module(x)
        with own_inputs(rt, 2):
            got = module(x)
        base = torch.nn.functional.linear(x, module.weight, module.bias)
    deltas = [x[i + 1] @ dense_delta(rt.adapters[n].deltas[key]).T for i, n in enumerate(two)]
    assert torch.allclose(got[0], base[0] + deltas[0] + deltas[1], atol=1e-5)
    assert torch.equal(got[1:], plain[1:])
    assert torch.allclose(plain[0], base[0], atol=1e-6)  # without the probe the composed row has no LoRA


def _effects_render(cp, names):
    from bench.miniworld.probes import Effects, pushes

    energy = torch.zeros(len(names), 2, dtype=torch.float64)
    strategy = Effects(5.0)
    with pushes(cp.runtime, names, energy):
        image = cp(
            PROMPT,
            loras=[(n, 1.0) for n in names],
            strategy=strategy,
            num_inference_steps=3,
            seed=1,
            progress=False,
            output_type="np",
            guidance_scale=5.0,
        )
    return image, energy, strategy.effect


def test_effects_with_one_lora_draw_merge_and_measure_one(cp):
    """One LoRA: the stack is the LoRA alone, so it pushes as hard as alone and moves the prediction as much
    (both ratios 1), and the picture is merge's."""
    one = ["purple-colour"]
    image, energy, effect = _effects_render(cp, one)
    merged = cp(
        PROMPT,
        loras=[(one[0], 1.0)],
        num_inference_steps=3,
        seed=1,
        progress=False,
        output_type="np",
        guidance_scale=5.0,
    )
    assert abs(image - merged).max() < 1e-4
    assert energy[0, 1] > 0 and abs(float(energy[0, 0] / energy[0, 1]) - 1) < 1e-4
    assert len(effect) == 3 and all(abs(e[0] - 1) < 1e-3 for e in effect)
    _, energy2, effect2 = _effects_render(cp, NAMES[:2])
    assert any(abs(float(energy2[i, 0] / energy2[i, 1]) - 1) > 1e-3 for i in range(2))  # the stack changes them
    assert any(abs(e - 1) > 1e-2 for step in effect2 for e in step)


def test_effects_combine_is_the_guided_leave_one_out_ratio():
    """``|g_all - g_{all without i}| / |g_i - g_base|`` on ``g = u + s (c - u)``, written out per adapter."""
    from lora_composer.fusion.base import StrategyContext
    from bench.miniworld.probes import Effects

    n, scale = 2, 3.0
    strategy = Effects(scale)
    strategy.begin(["a", "b"], [1.0, 1.0], 1, StrategyContext(cfg=True))
    plan = strategy.plan(0, 999.0)
    assert plan.weights.tolist() == [[1, 1], [0, 1], [1, 0], [1, 0], [0, 1], [0, 0]]
    p = torch.randn(2 * n + 2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = strategy.combine(p, plan)
    assert torch.equal(out, p[0])
    g = [p[k, :1] + scale * (p[k, 1:] - p[k, :1]) for k in range(2 * n + 2)]
    for i in range(n):
        want = torch.linalg.vector_norm(g[0] - g[1 + i]) / torch.linalg.vector_norm(g[1 + n + i] - g[-1])
        assert abs(strategy.effect[0][i] - float(want)) < 1e-5


def test_pushes_measure_each_delta_on_the_stack_rows_and_on_its_solo_rows(cp):
    """One convolution, six row groups of one row (Effects' order for two LoRAs): each LoRA's delta energy on
    row 0 (the stack) and on its solo row (3 + i), from the dense deltas by hand; the output is untouched."""
    from bench.miniworld.probes import pushes

    rt, two = cp.runtime, NAMES[:2]
    key = next(
        k
        for k in rt.layers
        if k.startswith("unet.") and k.endswith("conv1") and all(k in rt.adapters[n].deltas for n in two)
    )
    module = rt.layers[key].module
    x = torch.randn(6, module.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    energy = torch.zeros(2, 2, dtype=torch.float64)
    rt.set_denoiser_rows(torch.zeros(6, rt.denoiser_mix.slots))
    with torch.no_grad():
        plain = module(x)
        with pushes(rt, two, energy):
            got = module(x)
    assert torch.equal(got, plain)
    for i, n in enumerate(two):
        d = dense_delta(rt.adapters[n].deltas[key]).reshape(module.weight.shape)
        conv = [
            torch.nn.functional.conv2d(x[r : r + 1], d, None, module.stride, module.padding).pow(2).sum()
            for r in (0, 3 + i)
        ]
        assert torch.allclose(energy[i], torch.stack(conv).double(), rtol=1e-4)
