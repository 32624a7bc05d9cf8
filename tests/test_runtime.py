"""LoraRuntime on the tiny pipelines: per-row routing, exact fuse/unfuse, disable, add/remove, bad input.

Adapters are built straight from random factors (not through the file loader), so these tests pin the
runtime alone.
"""

import copy

import pytest
import torch

from lora_composer import tiny
from lora_composer.adapters.types import Adapter, LayerDelta
from lora_composer.driver import DenoiserDriver
from lora_composer.errors import AdapterMismatchError
from lora_composer.runtime import LoraRuntime
from lora_composer.fusion.base import StepPlan, Strategy


def adapter_from_layers(name, layers, alpha, family="sd15"):
    deltas = {}
    for comp, sd in layers.items():
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                deltas[f"{comp}.{module}"] = LayerDelta(down, sd[f"{module}.lora_B.weight"], alpha)
    return Adapter(name, family, deltas)


def unet_call(pipe, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    ehs = torch.randn(batch, 7, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor(500), encoder_hidden_states=ehs).sample


@pytest.fixture
def two(sd15_pipe):
    a = adapter_from_layers("a", tiny.random_lora_layers(sd15_pipe, seed=1, conv=True), alpha=8)
    b = adapter_from_layers("b", tiny.random_lora_layers(sd15_pipe, rank=2, seed=2), alpha=1)
    return a, b


def test_lora_changes_output_and_weights_are_linear(sd15_pipe, two):
    base = unet_call(sd15_pipe)
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    rt.set_weights({"a": 1.0, "b": 0.0})
    out_a = unet_call(sd15_pipe)
    assert (out_a - base).abs().max() > 1e-2  # the adapter really acts
    rt.set_weights({"a": 0.0, "b": 0.0})
    assert torch.equal(unet_call(sd15_pipe), base)  # weight 0 is skipped, not added as zeros


def test_per_row_weights_equal_separate_uniform_runs(sd15_pipe, two):
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    expected = []
    rows = torch.tensor([[0.7, 0.3], [0.0, 1.0]])
    for r in rows:
        rt.set_weights({"a": float(r[0]), "b": float(r[1])})
        expected.append(unet_call(sd15_pipe))
    rt.set_denoiser_rows(torch.stack([rows[0, [rt.slots["a"], rt.slots["b"]]], rows[1]]))
    mixed = unet_call(sd15_pipe)
    torch.testing.assert_close(mixed[0], expected[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], expected[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_unfuse_is_bit_exact_after_100_cycles(sd15_pipe, two, dtype):
    sd15_pipe.unet.to(dtype)
    sd15_pipe.text_encoder.to(dtype)
    originals = {k: v.clone() for k, v in sd15_pipe.unet.state_dict().items()}
    originals.update({f"te.{k}": v.clone() for k, v in sd15_pipe.text_encoder.state_dict().items()})
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    for i in range(100):
        rt.set_weights({"a": 0.7 + i * 1e-3, "b": 0.3}, {"a": 0.5, "b": 1.0})
        rt.fuse()
        rt.unfuse()
    current = dict(sd15_pipe.unet.state_dict())
    current.update({f"te.{k}": v for k, v in sd15_pipe.text_encoder.state_dict().items()})
    assert current.keys() == originals.keys()
    assert all(torch.equal(current[k], originals[k]) for k in originals)


def test_fused_matches_unfused(sd15_pipe, two):
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    rt.set_weights({"a": 0.7, "b": 0.3})
    unfused = unet_call(sd15_pipe)
    rt.fuse()
    fused = unet_call(sd15_pipe)
    assert (fused - unfused).abs().max() < 1e-5
    rt.set_weights({"a": 0.0, "b": 1.0})  # changing weights while fused refolds from the backup
    refolded = unet_call(sd15_pipe)
    rt.unfuse()
    assert (refolded - unet_call(sd15_pipe)).abs().max() < 1e-5


def test_per_row_weights_cannot_be_fused(sd15_pipe, two):
    rt = LoraRuntime(sd15_pipe)
    rt.add(two[0])
    rt.set_denoiser_rows(torch.tensor([[1.0], [0.0]]))
    before = {k: v.clone() for k, v in sd15_pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="per-row"):
        rt.fuse()
    assert all(torch.equal(v, before[k]) for k, v in sd15_pipe.unet.state_dict().items())


def test_disable_gives_exact_base_output(sd15_pipe, two):
    base = unet_call(sd15_pipe)
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    rt.set_weights({"a": 0.7, "b": 0.3})
    rt.fuse()
    rt.disable()
    assert torch.equal(unet_call(sd15_pipe), base)
    rt.enable()
    assert not torch.equal(unet_call(sd15_pipe), base)


def test_remove_and_clear(sd15_pipe, two):
    base = unet_call(sd15_pipe)
    keys = list(sd15_pipe.unet.state_dict())
    fresh = LoraRuntime(copy.deepcopy(sd15_pipe))
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    rt.set_weights({"a": 0.7, "b": 0.3})
    rt.remove("a")
    only_b = unet_call(sd15_pipe)

    fresh.add(two[1])
    fresh.set_weights({"b": 0.3})
    assert torch.equal(unet_call(fresh.pipe), only_b)

    rt.clear()
    assert torch.equal(unet_call(sd15_pipe), base)
    assert list(sd15_pipe.unet.state_dict()) == keys
    assert not any(m._forward_hooks for m in sd15_pipe.unet.modules())


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}, [
        len(m._forward_hooks) for m in pipe.unet.modules()
    ]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: setattr(d, "down", d.down[:, :-1]), "features"),
        (lambda d: d.up.__setitem__((0, 0), float("nan")), "NaN"),
    ],
)
def test_bad_adapter_leaves_pipeline_untouched(sd15_pipe, two, corrupt, message):
    rt = LoraRuntime(sd15_pipe)
    rt.add(two[1])
    rt.set_weights({"b": 1.0})
    before_out = unet_call(sd15_pipe)
    bad = copy.deepcopy(two[0])
    bad.path = "/loras/bad.safetensors"
    corrupt(list(bad.deltas.values())[-1])  # the last layer: all others would already be patched
    state = _state(sd15_pipe)
    with pytest.raises(AdapterMismatchError, match=message) as err:
        rt.add(bad)
    assert "/loras/bad.safetensors" in str(err.value) and "\n" not in str(err.value)
    after = _state(sd15_pipe)
    assert after[1] == state[1] and all(torch.equal(after[0][k], v) for k, v in state[0].items())
    assert set(rt.adapters) == {"b"}
    assert torch.equal(unet_call(sd15_pipe), before_out)


def test_family_and_missing_layer_errors(sd15_pipe, sdxl_pipe, two):
    rt = LoraRuntime(sd15_pipe)
    xl = adapter_from_layers("xl", tiny.random_lora_layers(sdxl_pipe), alpha=4, family="sdxl")
    with pytest.raises(AdapterMismatchError, match="sdxl"):
        rt.add(xl)
    xl.family = "unknown"  # even when undetected, the text_encoder_2 / layer mismatch is caught
    with pytest.raises(AdapterMismatchError):
        rt.add(xl)
    assert not rt.layers


class TwoGroups(Strategy):
    """Row group 0 carries adapter a alone, row group 1 adapter b alone (LoRA Composite's shape)."""

    name = "two-groups"

    def plan(self, step, timestep):
        return StepPlan(torch.eye(2))


def test_driver_row_groups_average_single_adapter_passes(sd15_pipe, two):
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    singles = []
    for w in ({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}):
        rt.set_weights(w)
        singles.append(unet_call(sd15_pipe))
    strategy = TwoGroups()
    strategy.begin(["a", "b"], [1.0, 1.0], num_steps=1)
    with DenoiserDriver(rt, sd15_pipe.unet, strategy, ["a", "b"]) as driver:
        grouped = unet_call(sd15_pipe)
    assert grouped.shape == singles[0].shape
    torch.testing.assert_close(grouped, (singles[0] + singles[1]) / 2, atol=1e-5, rtol=1e-5)
    assert driver.step == 1 and len(driver.history) == 1
    # the denoiser is itself again after the generation: no instance forward, no hook registry left behind
    assert "forward" not in vars(sd15_pipe.unet) and not hasattr(sd15_pipe.unet, "_diffusers_hook")


class Plan(Strategy):
    name = "fixed-plan"

    def __init__(self, plan):
        self.fixed = plan

    def plan(self, step, timestep):
        return self.fixed


def _drive(pipe, rt, plan, **kw):
    strategy = Plan(plan)
    strategy.begin(["a", "b"], [1.0, 1.0], num_steps=1)
    with DenoiserDriver(rt, pipe.unet, strategy, ["a", "b"], **kw) as driver:
        out = unet_call(pipe)
    return out, driver


def test_driver_chunks_combines_and_reuses(sd15_pipe, two):
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    whole, d1 = _drive(sd15_pipe, rt, StepPlan(weights))
    chunked, d2 = _drive(sd15_pipe, rt, StepPlan(weights), max_batch=2)  # batch 2: one group per pass
    assert (d1.calls, d2.calls) == (1, 3) and d2.rows == d1.rows == 6
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)

    singles = []
    for w in weights:
        rt.set_weights({"a": float(w[0]), "b": float(w[1])})
        singles.append(unet_call(sd15_pipe))
    combine = torch.tensor([0.5, 0.25, 0.25])
    combined, _ = _drive(sd15_pipe, rt, StepPlan(weights, combine=combine))
    torch.testing.assert_close(combined, sum(c * s for c, s in zip(combine, singles)), atol=1e-5, rtol=1e-5)

    strategy = Plan(StepPlan(weights, reuse=torch.tensor([False, True, True])))
    strategy.begin(["a", "b"], [1.0, 1.0], num_steps=2)
    with DenoiserDriver(rt, sd15_pipe.unet, strategy, ["a", "b"]) as driver:
        first = unet_call(sd15_pipe)
        assert driver.rows == 6  # nothing cached yet: every group computed
        second = unet_call(sd15_pipe)
        assert driver.rows == 8  # then only group 0 is recomputed
    torch.testing.assert_close(second, first, atol=1e-5, rtol=1e-5)


def test_layer_group_weights(sd15_pipe, two):
    rt = LoraRuntime(sd15_pipe)
    for ad in two:
        rt.add(ad)
    rt.set_weights({"a": 0.7, "b": 0.3})
    merged = unet_call(sd15_pipe)
    groups = rt.layer_groups()
    assert "unet.down_blocks.0" in groups and "unet.mid_block" in groups
    w = torch.tensor([[0.7, 0.3]])
    same, _ = _drive(sd15_pipe, rt, StepPlan(w, layer_weights={g: w for g in groups}))
    torch.testing.assert_close(same, merged, atol=1e-6, rtol=1e-6)
    off = {g: torch.zeros(1, 2) for g in groups if g != "unet.mid_block"}
    only_mid, _ = _drive(sd15_pipe, rt, StepPlan(w, layer_weights=off))
    rt.set_weights({"a": 0.0, "b": 0.0})
    base = unet_call(sd15_pipe)
    assert not torch.allclose(only_mid, base) and not torch.allclose(only_mid, merged)
