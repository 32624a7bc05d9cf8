"""DoRA at a weight other than 1: ``dora_scaling="comfy"`` (default, ``W0 + w (DoRA(W0) - W0)``) or ``"peft"``
(``m (W0 + w d) / ||W0 + w d||``, PEFT's and diffusers' meaning), the latter checked against PEFT's own DoRA
layer at that scale, unfused (uniform and per-row weights) and fused."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_composer.adapters import load_adapter
from lora_composer.errors import AdapterLoadError
from lora_composer.runtime import LoraRuntime

MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture
def peft_dora(sd15_pipe, tmp_path):
    """A PEFT DoRA folder written by PEFT itself (random A and B), and the PEFT-wrapped UNet it came from."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=[MODULE], use_dora=True, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(sd15_pipe.unet), cfg)
    with torch.no_grad():
        layer = model.base_model.model.get_submodule(MODULE)
        layer.lora_B["default"].weight.mul_(20)  # a delta large enough for the two meanings to differ clearly
    folder = tmp_path / "dora"
    model.save_pretrained(str(folder))
    return folder, layer


def _x(width):
    return torch.randn(2, 7, width, generator=torch.Generator().manual_seed(4))


def _peft_out(layer, x, w):
    layer.set_scale("default", w)  # PEFT's adapter weight: scaling = w * alpha / r
    with torch.no_grad():
        return layer(x)


def test_peft_scaling_matches_peft_and_comfy_is_the_default(sd15_pipe, peft_dora):
    folder, peft_layer = peft_dora
    module = sd15_pipe.unet.get_submodule(MODULE)
    x = _x(module.in_features)
    w = 0.7
    want = _peft_out(peft_layer, x, w)
    at_one = _peft_out(peft_layer, x, 1.0)

    comfy = load_adapter(folder, name="comfy")
    peft = load_adapter(folder, name="peft", dora_scaling="peft")
    assert {d.kind for d in peft.deltas.values()} == {"dora"}
    rt = LoraRuntime(sd15_pipe)
    rt.add(comfy)
    rt.add(peft)
    with torch.no_grad():
        rt.set_weights(unet={"peft": 1.0})
        torch.testing.assert_close(module(x), at_one, atol=1e-5, rtol=1e-5)  # the meanings agree at 1
        rt.set_weights(unet={"comfy": 1.0})
        torch.testing.assert_close(module(x), at_one, atol=1e-5, rtol=1e-5)
        rt.set_weights(unet={"peft": w})
        torch.testing.assert_close(module(x), want, atol=1e-5, rtol=1e-5)
        rt.set_weights(unet={"comfy": w})
        comfy_out = module(x)
        assert (comfy_out - want).abs().max() > 1e-2  # the default is ComfyUI's meaning, not PEFT's
        base = peft_layer.get_base_layer()
        w0 = base.weight.detach()
        d = load_adapter(folder).deltas[f"unet.{MODULE}"]
        by_hand = w0 + w * d.dense(w0)[0]  # W0 + w (DoRA(W0) - W0)
        torch.testing.assert_close(comfy_out, torch.nn.functional.linear(x, by_hand, base.bias), atol=1e-5, rtol=1e-5)

        rt.set_weights(unet={"peft": w})
        rt.fuse()
        torch.testing.assert_close(module(x), want, atol=1e-5, rtol=1e-5)
        rt.unfuse()
    rt.clear()
    assert torch.equal(module.weight, peft_layer.get_base_layer().weight)


def test_peft_scaling_per_row(sd15_pipe, peft_dora):
    folder, peft_layer = peft_dora
    module = sd15_pipe.unet.get_submodule(MODULE)
    x = torch.randn(3, 7, module.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = module(x)
    rt = LoraRuntime(sd15_pipe)
    rt.add(load_adapter(folder, name="peft", dora_scaling="peft"))
    slot = rt.slots["peft"]
    weights = torch.zeros(3, rt.denoiser_mix.slots)
    weights[0, slot], weights[1, slot] = 0.7, 0.3  # row 2: weight 0, the adapter off
    rt.denoiser_mix.set(weights)
    with torch.no_grad():
        got = module(x)
    torch.testing.assert_close(got[0:1], _peft_out(peft_layer, x[0:1], 0.7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:2], _peft_out(peft_layer, x[1:2], 0.3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2:3], base[2:3], atol=1e-6, rtol=0)


def test_an_unknown_dora_scaling_is_one_line(peft_dora):
    folder, _ = peft_dora
    with pytest.raises(AdapterLoadError, match="dora_scaling must be one of comfy, peft"):
        load_adapter(folder, dora_scaling="diffusers")
