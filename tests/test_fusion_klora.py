"""klora (K-LoRA's layer-wise selection, N LoRAs) against its definition.

End to end: the tiny SD1.5 pipeline with the adapters loaded through diffusers/PEFT; the test computes, from
PEFT's own per-layer deltas, which LoRA wins each layer (the sum of its top-k |w dW| entries over its mean
across layers) and silences the others there (PEFT ``scaling`` 0); that picture must equal the strategy's.
"""

import copy

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from lora_composer.adapters.types import Adapter, LayerDelta
from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.pipeline import ComposerPipeline

PROMPT = "a red circle"
CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")


def _score(delta: torch.Tensor, k: int) -> float:
    return float(delta.abs().flatten().sort(descending=True).values[:k].sum())


def _winners(per_layer: dict[str, list[torch.Tensor]], k: int, keep: int) -> dict[str, set[int]]:
    """From the definition: score = top-k sum of |w dW| / that LoRA's mean score over the layers."""
    n = len(next(iter(per_layer.values())))
    raw = {key: [_score(d, k) for d in ds] for key, ds in per_layer.items()}
    means = [np.mean([raw[key][i] for key in raw]) for i in range(n)]
    out = {}
    for key, s in raw.items():
        order = sorted(range(n), key=lambda i: (-s[i] / means[i], i))
        out[key] = set(order[:keep])
    return out


def test_the_layer_goes_to_the_lora_that_stands_out_most_there():
    """Normalising by each LoRA's own mean matters: b is smaller everywhere but stands out in layer y."""
    g = torch.Generator().manual_seed(0)

    def lora(scale_x, scale_y):
        d = lambda s: LayerDelta(
            down=torch.randn(2, 16, generator=g), up=s * torch.randn(16, 2, generator=g), alpha=2.0
        )  # noqa: E731
        return {"x": d(scale_x), "y": d(scale_y), "z": d(1.0)}

    a, b = Adapter("a", "lora", lora(10.0, 10.0)), Adapter("b", "lora", lora(0.1, 5.0))
    b.deltas["only_b"] = LayerDelta(down=torch.ones(1, 4), up=torch.ones(4, 1), alpha=1.0)
    strat = get_strategy("klora", top_k=8)
    strat.begin(["a", "b"], [1.0, 1.0], 4, StrategyContext(adapters=[a, b]))
    got = strat.derived_adapters()
    per_layer = {
        k: [
            (a.deltas[k].up * a.deltas[k].scale) @ a.deltas[k].down,
            (b.deltas[k].up * b.deltas[k].scale) @ b.deltas[k].down,
        ]
        for k in ("x", "y", "z")
    }
    # the definition's mean runs over each LoRA's own layers: add b's extra layer to its mean by hand
    raw_b = [_score(per_layer[k][1], 8) for k in ("x", "y", "z")] + [_score(torch.ones(4, 4), 8)]
    raw_a = [_score(per_layer[k][0], 8) for k in ("x", "y", "z")]
    expected = {
        k: ("a" if raw_a[j] / np.mean(raw_a) >= raw_b[j] / np.mean(raw_b) else "b")
        for j, k in enumerate(("x", "y", "z"))
    }
    assert expected["x"] == "a" and expected["y"] == "b"  # the case is the one described above
    for k, name in expected.items():
        assert (k in got[name].deltas) and (k not in got["b" if name == "a" else "a"].deltas), k
    assert "only_b" in got["b"].deltas and got["a"].name == "a~klora"


def test_klora_matches_the_reference(sd15_pipe, make_lora):
    files = {n: make_lora(sd15_pipe, n, rank=4, alpha=4 + i, seed=i + 1, conv=True) for i, n in enumerate("abc")}
    weights, k = [1.0, 0.6, 0.8], 16
    ref = copy.deepcopy(sd15_pipe)
    names = list(files)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(names, weights)
    layers = {}
    for comp in ("unet", "text_encoder"):
        for mod_name, module in getattr(ref, comp).named_modules():
            if isinstance(module, BaseTunerLayer):
                layers[(comp, mod_name)] = module
    per_layer = {
        key: [w * m.get_delta_weight(n).detach().float() for n, w in zip(names, weights)] for key, m in layers.items()
    }
    winners = _winners(per_layer, k, keep=1)
    assert len({next(iter(w)) for w in winners.values()}) == 3  # every LoRA wins somewhere
    for key, m in layers.items():
        for i, n in enumerate(names):
            if i not in winners[key]:
                m.scaling[n] = 0.0
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
    got = run(strategy="klora", strategy_args={"top_k": k})
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - run()).max() > 1e-3  # not merge


@pytest.mark.parametrize("args", [{"top_k": 0}, {"keep": 0}])
def test_bad_arguments_are_one_line_errors(args):
    with pytest.raises(ComposerError, match="strategy 'klora'"):
        get_strategy("klora", **args)
