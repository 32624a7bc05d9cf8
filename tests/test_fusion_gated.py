"""gated: prompt-response gates per layer group and timestep, checked against plain torch and merge."""

import copy

import numpy as np
import pytest
import torch

from lora_composer import tiny
from lora_composer.adapters.types import Adapter, LayerDelta
from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext
from lora_composer.pipeline import ComposerPipeline
from lora_composer.runtime import LoraRuntime
from lora_composer.fusion import get_strategy
from lora_composer.fusion.gated import GatedStrategy, gates_from_responses, layer_response, prompt_responses

CALL = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np")


def adapter_from_layers(name, layers, alpha, scale_of=lambda key: 1.0):
    """An Adapter from PEFT-format random layers; ``scale_of(key)`` multiplies each key's ``up``."""
    deltas = {}
    for comp, sd in layers.items():
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                full = f"{comp}.{module}"
                deltas[full] = LayerDelta(down, sd[f"{module}.lora_B.weight"] * scale_of(full), alpha)
    return Adapter(name, "sd15", deltas)


def test_layer_response_equals_plain_torch():
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen)
    e = torch.randn(2, 7, 5, generator=gen)
    dw = (6.0 / 3) * up @ down  # alpha 6, rank 3
    expected = torch.stack([torch.linalg.norm(dw @ tok) / torch.linalg.norm(tok) for tok in e.reshape(-1, 5)]).mean()
    got = layer_response(down, up, 6.0 / 3, e)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    # Groups: mean over the group's k/v layers (a missing delta counts 0), other layers ignored, groups
    # without cross-attention get the mean of the others.
    k, v = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "unet.mid_block.attentions.0.x.attn2.to_v"
    k2 = k.replace("to_k", "to_v")
    q = k.replace("attn2.to_k", "attn1.to_q")
    d = lambda s: LayerDelta(down * s, up, 6.0)  # noqa: E731
    a = Adapter("a", "sd15", {k: d(1.0), k2: d(2.0), v: d(0.5), q: d(9.0)})
    b = Adapter("b", "sd15", {k: d(3.0)})
    groups = ["unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block"]
    r = prompt_responses([a, b], groups, e)
    one = float(layer_response(down, up, 2.0, e))
    expected = torch.tensor([[(1.0 + 2.0) / 2 * one, 3.0 / 2 * one], [0, 0], [0.5 * one, 0.0]])
    expected[1] = (expected[0] + expected[2]) / 2
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=1e-5)


def test_gates_formula():
    r = torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.0, 0.0]])
    rel = r / r.mean(dim=0)
    rel[2] = 1e-6  # no reaction in that group from either: equal gates
    expected = 2 * torch.softmax(rel.log() / 2.0, dim=1)
    torch.testing.assert_close(gates_from_responses(r, temperature=2.0), expected.float(), atol=1e-6, rtol=1e-6)
    assert torch.equal(gates_from_responses(r, temperature=float("inf")), torch.ones(3, 2))
    # An adapter that reacts nowhere gets a neutral relative response (1) rather than 0.
    g = gates_from_responses(torch.tensor([[2.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(g, 2 * torch.softmax(torch.tensor([[4 / 3, 1.0], [2 / 3, 1.0]]).log(), dim=1))


def _encode(pipe, prompt="a red circle"):
    pos, neg = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True)[:2]
    return torch.cat([neg, pos])


def test_gates_follow_where_each_adapter_reacts(sd15_pipe):
    layers_a = tiny.random_lora_layers(sd15_pipe, seed=1, conv=True, text_encoder=False)
    layers_b = tiny.random_lora_layers(sd15_pipe, seed=2, rank=2, text_encoder=False)
    in_down = lambda key: ".down_blocks." in key  # noqa: E731
    # A: k/v deltas in the down blocks, ~0 elsewhere; B the reverse. A is much louder overall (alpha 16 vs 1).
    a = adapter_from_layers("a", layers_a, alpha=16, scale_of=lambda k: 1.0 if in_down(k) else 1e-4)
    b = adapter_from_layers("b", layers_b, alpha=1, scale_of=lambda k: 1e-4 if in_down(k) else 1.0)
    rt = LoraRuntime(sd15_pipe)
    rt.add(a)
    rt.add(b)
    ehs = _encode(sd15_pipe)
    for per_adapter in (True, False):
        strat = GatedStrategy(schedule="constant", per_adapter=per_adapter)
        strat.begin(["a", "b"], [0.8, 0.5], 2, StrategyContext(adapters=[a, b], runtime=rt, pipe=sd15_pipe))
        strat.observe(0, 900.0, {"sample": None, "encoder_hidden_states": ehs})
        plan = strat.plan(0, 900.0)
        groups = rt.layer_groups()
        assert set(plan.layer_weights) == set(groups) and "unet.down_blocks.1" in groups  # conv-only group
        cross = ["unet.down_blocks.0", "unet.mid_block", "unet.up_blocks.1"]
        gates = {g: strat.trace[-1][strat.layer_groups.index(g)] for g in cross}
        assert gates["unet.down_blocks.0"][0] > 1.5 > 0.5 > gates["unet.down_blocks.0"][1]
        for g in ("unet.mid_block", "unet.up_blocks.1"):
            assert gates[g][1] > 1.5 > 0.5 > gates[g][0] or not per_adapter
        r = strat.responses
        torch.testing.assert_close(r[strat.layer_groups.index("unet.down_blocks.1")], r[[strat.layer_groups.index(g) for g in cross]].mean(0))
        w = plan.layer_weights["unet.down_blocks.0"][0]
        torch.testing.assert_close(w, torch.tensor([0.8, 0.5]) * gates["unet.down_blocks.0"])
    # Without per-adapter normalisation the loud adapter (alpha 16 on rank 4) wins everywhere but B's home
    # groups still lean to B more than A's home group does.
    assert gates["unet.up_blocks.1"][1] > gates["unet.down_blocks.0"][1]
    # Responses come from the conditional half of the CFG batch ([negative, positive]) only.
    strat.begin(["a", "b"], [0.8, 0.5], 2, StrategyContext(adapters=[a, b], runtime=rt, pipe=sd15_pipe))
    strat.observe(0, 900.0, {"encoder_hidden_states": torch.cat([torch.randn_like(ehs[1:]) * 50, ehs[1:]])})
    torch.testing.assert_close(strat.responses, prompt_responses([a, b], strat.layer_groups, ehs[1:]))
    # The response is computed once per generation: a second observe with other inputs changes nothing.
    before = strat.responses.clone()
    strat.observe(1, 500.0, {"encoder_hidden_states": torch.randn_like(ehs)})
    assert torch.equal(strat.responses, before)


def test_schedules():
    early, late, const = (GatedStrategy(schedule=s) for s in ("early", "late", "constant"))
    for s in (early, late, const):
        s.begin(["a"], [1.0], 4, StrategyContext())
    assert early.blend(0, 999.0) > early.blend(3, 10.0) and late.blend(0, 999.0) < late.blend(3, 10.0)
    assert const.blend(0, 999.0) == const.blend(3, 10.0) == 1.0
    assert early.blend(0, None) == 1.0 and early.blend(3, None) == 0.0  # no timestep: the step fraction
    assert GatedStrategy(strength=0.5, schedule="constant").strength == 0.5
    assert get_strategy("gated", temperature="inf").temperature == float("inf")
    for bad in ({"temperature": 0}, {"strength": 2}, {"schedule": "sometimes"}, {"nope": 1}):
        with pytest.raises(ComposerError):
            get_strategy("gated", **bad)


def test_uniform_gates_equal_merge_and_gates_change_the_image(sd15_pipe, make_lora):
    files = [make_lora(sd15_pipe, n, seed=i + 1, conv=True, alpha=4 * (i + 1)) for i, n in enumerate("ab")]
    loras = [(files[0], 0.7), (files[1], 0.4)]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    merged = composer("a red circle", loras=loras, seed=0, progress=False, **CALL)
    uniform = composer("a red circle", loras=loras, strategy="gated", strategy_args={"temperature": float("inf")},
                       seed=0, progress=False, **CALL)
    assert np.abs(uniform - merged).max() < 1e-5
    off = composer("a red circle", loras=loras, strategy="gated", strategy_args={"strength": 0.0},
                   seed=0, progress=False, **CALL)
    assert np.abs(off - merged).max() < 1e-5

    gated = composer("a red circle", loras=loras, strategy="gated", strategy_args={"schedule": "constant"},
                     seed=0, progress=False, **CALL)
    history = composer.last_driver.history
    assert len(history) == CALL["num_inference_steps"]
    table = torch.stack([history[0].layer_weights[g][0] for g in composer.runtime.layer_groups()])
    assert not torch.allclose(table, torch.tensor([0.7, 0.4]).expand_as(table))  # really per layer group
    assert np.abs(gated - merged).max() > 1e-4
    assert composer.last_record.strategy == "gated" and composer.last_record.strategy_args["schedule"] == "constant"


def test_runs_on_sdxl(sdxl_pipe, make_lora):
    files = [make_lora(sdxl_pipe, n, seed=i + 1) for i, n in enumerate("ab")]
    composer = ComposerPipeline(copy.deepcopy(sdxl_pipe))
    out = composer("a red circle", loras=[(files[0], 0.7), (files[1], 0.4)], strategy="gated", seed=0,
                   progress=False, **CALL)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    history = composer.last_driver.history
    groups = composer.runtime.layer_groups()
    assert len(history) == CALL["num_inference_steps"] and set(history[0].layer_weights) == set(groups)
    strat_trace = [torch.stack([p.layer_weights[g][0] for g in groups]) for p in history]
    assert all(t.shape == (len(groups), 2) and torch.isfinite(t).all() for t in strat_trace)
    assert not torch.allclose(strat_trace[0], strat_trace[-1])  # "early": the gates fade towards merge
