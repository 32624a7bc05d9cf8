"""marginal (leave-one-out guidance) against a formula written from its definition.

End to end: the tiny SD1.5 pipeline with the adapters loaded through diffusers/PEFT; the reference UNet runs
the merge (PEFT ``set_adapters`` with every adapter) and each leave-one-out merge, and applies
``e_all + scale * sum_i (e_all - e_{all without i})`` written here, independently of the strategy's code.
"""

import copy

import numpy as np
import pytest
import torch

from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.pipeline import ComposerPipeline

PROMPT = "a red circle"
STEPS = 4
CALL = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, output_type="np")


def marginal_formula(merged, leave_out, scale):
    """e_all + scale * sum_i (e_all - e_{all without i}), numpy."""
    return merged + scale * sum(merged - e for e in leave_out)


def _reference(pipe, files, weights, scale, until):
    ref = copy.deepcopy(pipe)
    names = list(files)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(names, weights)  # the prompt is encoded with every adapter
    unet, forward, step = ref.unet, ref.unet.forward, [0]

    def run(ws, *args, **kwargs):
        unet.set_adapters(names, ws)
        out = forward(*args, **kwargs)
        return out, (out[0] if isinstance(out, tuple) else out.sample)

    def composed(*args, **kwargs):
        out, merged = run(weights, *args, **kwargs)
        if step[0] < until * STEPS:
            leave_out = [
                run([0.0 if j == i else w for j, w in enumerate(weights)], *args, **kwargs)[1].numpy()
                for i in range(len(names))
            ]
            mixed = torch.as_tensor(marginal_formula(merged.numpy(), leave_out, scale), dtype=merged.dtype)
            if isinstance(out, tuple):
                out = (mixed, *out[1:])
            else:
                out.sample = mixed
        step[0] += 1
        return out

    unet.forward = composed
    return ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images


@pytest.mark.parametrize("scale, until", [(1.0, 1.0), (0.5, 0.5)])
def test_marginal_matches_the_reference(sd15_pipe, make_lora, scale, until):
    files = {n: make_lora(sd15_pipe, n, rank=4, alpha=4 + i, seed=i + 1, conv=(i == 0)) for i, n in enumerate("abc")}
    weights = [1.0, 0.6, 0.8]
    expected = _reference(sd15_pipe, files, weights, scale, until)

    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    run = lambda **kw: composer(
        PROMPT,
        loras=list(zip(files.values(), weights)),
        seed=0,
        progress=False,  # noqa: E731
        **CALL,
        **kw,
    )
    got = run(strategy="marginal", strategy_args={"scale": scale, "until": until})
    amplified = int(until * STEPS)
    assert composer.last_driver.rows == 2 * (4 * amplified + (STEPS - amplified))  # CFG rows x groups per step
    assert composer.last_record.strategy_args == {"scale": scale, "until": until}
    merged = run()
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - merged).max() > 1e-3  # not merge: the comparison means something


def test_marginal_plan():
    strat = get_strategy("marginal", scale=0.5)
    strat.begin(["a", "b", "c"], [1.0, 0.6, 0.8], 10, StrategyContext())
    plan = strat.plan(0, 999.0)
    assert torch.allclose(plan.weights, torch.tensor([[1.0, 0.6, 0.8], [0, 0.6, 0.8], [1.0, 0, 0.8], [1.0, 0.6, 0]]))
    assert torch.allclose(plan.combine, torch.tensor([2.5, -0.5, -0.5, -0.5]))
    merged = torch.randn(4, 2, 3)  # the linear combination is the formula
    assert torch.allclose(
        strat.combine(merged, plan),
        torch.as_tensor(marginal_formula(merged[0].numpy(), [merged[i].numpy() for i in (1, 2, 3)], 0.5)),
        atol=1e-6,
    )
    late = get_strategy("marginal", until=0.3)
    late.begin(["a", "b"], [1, 1], 10)
    assert late.plan(2, None).row_groups == 3 and late.plan(3, None).row_groups == 1
    for bad in (dict(scale=-1), dict(until=2)):
        with pytest.raises(ComposerError, match=next(iter(bad))):
            get_strategy("marginal", **bad)
