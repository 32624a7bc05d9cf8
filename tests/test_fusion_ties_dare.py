"""ties and dare (weight-space merges of the LoRAs' dense deltas) against PEFT's own merge functions.

End to end for ties: the tiny SD1.5 pipeline with the adapters loaded through diffusers/PEFT; every LoRA
layer's delta is PEFT's ``get_delta_weight``, merged by ``peft.utils.merge_utils.ties`` and written into a
copy of the base model that has no adapters at all; its picture must equal the strategy's.
"""

import copy

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import merge_utils

from lora_composer.adapters import load_adapter
from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.fusion.task_arithmetic import derive
from lora_composer.pipeline import ComposerPipeline

PROMPT = "a red circle"
CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")


def _peft_merged_model(pipe, files, weights, merge):
    """A copy of ``pipe`` without adapters whose LoRA layers hold ``W0 + merge([dW_i], weights)``."""
    loaded = copy.deepcopy(pipe)
    names = list(files)
    for name, path in files.items():
        loaded.load_lora_weights(str(path), adapter_name=name)
    plain = copy.deepcopy(pipe)
    changed = 0
    for comp in ("unet", "text_encoder"):
        for mod_name, module in getattr(loaded, comp).named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            deltas = [module.get_delta_weight(n).detach().float() for n in names]
            merged = merge(deltas, torch.tensor(weights))
            target = getattr(plain, comp).get_submodule(mod_name)
            with torch.no_grad():
                target.weight += merged.to(target.weight.dtype)
            changed += 1
    assert changed > 20
    return plain


@pytest.fixture
def three_loras(sd15_pipe, make_lora):
    files = {n: make_lora(sd15_pipe, n, rank=4, alpha=4 + i, seed=i + 1, conv=True) for i, n in enumerate("abc")}
    return files, [1.0, 0.6, 0.8]


def test_ties_matches_peft_ties(sd15_pipe, three_loras):
    files, weights = three_loras
    density, sign = 0.3, "total"
    ref = _peft_merged_model(
        sd15_pipe, files, weights, lambda d, w: merge_utils.ties(d, w, density, majority_sign_method=sign)
    )
    expected = ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images

    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    run = lambda **kw: composer(
        PROMPT,
        loras=list(zip(files.values(), weights)),
        seed=0,
        progress=False,  # noqa: E731
        **CALL,
        **kw,
    )
    got = run(strategy="ties", strategy_args={"density": density, "sign": sign})
    assert composer.last_record.strategy_args == {"density": density, "sign": sign, "rank": 0}
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - run()).max() > 1e-3  # not merge: the comparison means something
    assert not composer.runtime.adapters or all("~" not in n for n in composer.runtime.adapters)  # detached after


def test_ties_frequency_sign_per_layer_is_peft_ties(three_loras):
    files, _ = three_loras
    adapters = [load_adapter(p) for p in files.values()]
    weights = torch.tensor([1.0, -0.6, 0.8])
    strat = get_strategy("ties", density=0.6, sign="frequency")
    strat.begin([a.name for a in adapters], weights.tolist(), 4, StrategyContext(adapters=adapters))
    derived = strat.derived_adapters()
    for key in list(adapters[0].deltas)[:12]:
        expected = merge_utils.ties(list(_stack_of(adapters, key)), weights, 0.6, majority_sign_method="frequency")
        got = sum(float(w) * derived[a.name].deltas[key].diff for w, a in zip(weights, adapters))
        assert torch.allclose(got, expected, atol=1e-6)


def test_ties_at_full_density_with_one_lora_is_that_lora(sd15_pipe, make_lora):
    """Nothing to trim or elect: the derived adapter acts like the original (dense, and refactored at its rank)."""
    path = make_lora(sd15_pipe, "a", rank=4, seed=3, conv=True)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    run = lambda **kw: composer(PROMPT, loras=[(path, 0.7)], seed=0, progress=False, **CALL, **kw)  # noqa: E731
    merged = run()
    for args in ({"density": 1.0}, {"density": 1.0, "rank": 4}):
        assert np.abs(run(strategy="ties", strategy_args=args) - merged).max() < 1e-4


def _stack_of(adapters, key):
    from lora_composer.adapters.shira import dense_delta

    return torch.stack([dense_delta(a.deltas[key]) for a in adapters])


def test_dare_drops_and_rescales(sd15_pipe, three_loras):
    """DARE's definition: each entry kept with probability ``density``, divided by it; seeded."""
    files, _ = three_loras
    adapters = [load_adapter(p) for p in files.values()]
    density = 0.4
    strat = get_strategy("dare", density=density, seed=7)
    strat.begin([a.name for a in adapters], [1.0] * 3, 4, StrategyContext(adapters=adapters))
    derived = strat.derived_adapters()
    kept = total = 0
    for key in adapters[0].deltas:
        original = _stack_of(adapters, key)
        new = torch.stack([derived[a.name].deltas[key].diff.reshape(original.shape[1:]) for a in adapters])
        nonzero = new != 0
        assert torch.allclose(new[nonzero], original[nonzero] / density, rtol=1e-6, atol=0)
        kept, total = kept + int(nonzero.sum()), total + new.numel()
    assert abs(kept / total - density) < 0.01
    again = get_strategy("dare", density=density, seed=7)
    again.begin([a.name for a in adapters], [1.0] * 3, 4, StrategyContext(adapters=adapters))
    other = get_strategy("dare", density=density, seed=8)
    other.begin([a.name for a in adapters], [1.0] * 3, 4, StrategyContext(adapters=adapters))
    key = next(iter(adapters[0].deltas))
    name = adapters[1].name
    assert torch.equal(again.derived_adapters()[name].deltas[key].diff, derived[name].deltas[key].diff)
    assert not torch.equal(other.derived_adapters()[name].deltas[key].diff, derived[name].deltas[key].diff)


def test_dare_ties_is_peft_disjoint_merge_of_its_masks(sd15_pipe, three_loras):
    """combine=ties: PEFT's sign election and disjoint merge of the dropped-and-rescaled deltas."""
    files, _ = three_loras
    adapters = [load_adapter(p) for p in files.values()]
    weights = torch.tensor([1.0, 0.6, 0.8])
    linear, tied = (get_strategy("dare", density=0.5, seed=1, combine=c) for c in ("linear", "ties"))
    for s in (linear, tied):
        s.begin([a.name for a in adapters], weights.tolist(), 4, StrategyContext(adapters=adapters))
    for key in list(adapters[0].deltas)[:12]:
        dropped = torch.stack([linear.derived_adapters()[a.name].deltas[key].diff for a in adapters])  # same seed
        mask = merge_utils.calculate_majority_sign_mask(dropped, method="total")
        expected = merge_utils.disjoint_merge(dropped * weights.view(-1, 1, 1), mask)
        got = sum(float(w) * tied.derived_adapters()[a.name].deltas[key].diff for w, a in zip(weights, adapters))
        assert torch.allclose(got, expected, atol=1e-6)


def test_derive_keeps_layers_it_cannot_read():
    """A multiplicative delta (here IA3) is left as it is; adapters without a layer stay without it."""
    from lora_composer.adapters.kinds import IA3Delta
    from lora_composer.adapters.types import Adapter, LayerDelta

    g = torch.Generator().manual_seed(0)
    lora = lambda: LayerDelta(down=torch.randn(2, 5, generator=g), up=torch.randn(3, 2, generator=g), alpha=2.0)  # noqa: E731
    ia3 = IA3Delta(scale_vec=torch.rand(3, generator=g) + 0.5, on_input=False)
    a = Adapter("a", "lora", {"x": lora(), "y": ia3})
    b = Adapter("b", "lora", {"x": lora(), "y": lora(), "z": lora()})
    out = derive([a, b], lambda stack, names: stack * 2, "~t")
    assert out["a"].deltas["y"] is ia3 and "z" not in out["a"].deltas
    assert torch.allclose(out["b"].deltas["z"].diff, 2 * (b.deltas["z"].up * 1.0) @ b.deltas["z"].down)
    assert out["a"].name == "a~t"


@pytest.mark.parametrize(
    "name, args",
    [("ties", {"density": 0}), ("ties", {"sign": "mean"}), ("dare", {"combine": "sum"}), ("dare", {"rank": -1})],
)
def test_bad_arguments_are_one_line_errors(name, args):
    with pytest.raises(ComposerError, match=f"strategy '{name}'"):
        get_strategy(name, **args)
