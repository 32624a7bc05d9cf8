"""LyCORIS norm layers (``w_norm`` / ``b_norm``): additive differences on a LayerNorm's or GroupNorm's weight and
bias, checked against the formula by hand and LyCORIS's own ``NormModule`` forward, unfused and fused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lora_composer.adapters import load_adapter
from lora_composer.adapters.kinds.registry import kind_label
from lora_composer.errors import AdapterLoadError, ComposerError
from lora_composer.runtime import LoraRuntime

LAYERS = {  # kohya name -> (component, module path)
    "lora_unet_down_blocks_0_resnets_0_norm1": ("unet", "down_blocks.0.resnets.0.norm1"),  # GroupNorm
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1": (
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1",
    ),  # LayerNorm
    "lora_te_encoder_layers_0_layer_norm1": ("text_encoder", "encoder.layers.0.layer_norm1"),  # CLIP's LayerNorm
}


def _module(pipe, comp, path):
    root = getattr(pipe, comp)
    return root.get_submodule(path if comp == "unet" or not hasattr(root, "text_model") else "text_model." + path)


def _file(pipe, tmp_path, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (comp, path) in LAYERS.items():
        n = _module(pipe, comp, path).weight.numel()
        sd[f"{name}.w_norm"] = torch.randn(n, generator=gen)
        sd[f"{name}.b_norm"] = torch.randn(n, generator=gen)
    p = tmp_path / "norms.safetensors"
    save_file(sd, str(p))
    return p, sd


def _input(module):
    gen = torch.Generator().manual_seed(9)
    if isinstance(module, torch.nn.GroupNorm):
        return torch.randn(2, module.num_channels, 4, 4, generator=gen)
    return torch.randn(2, 5, module.normalized_shape[0], generator=gen)


def _by_hand(module, x, w0, b0, dw, db):
    if isinstance(module, torch.nn.GroupNorm):
        return F.group_norm(x, module.num_groups, w0 + dw, b0 + db, module.eps)
    return F.layer_norm(x, module.normalized_shape, w0 + dw, b0 + db, module.eps)


def test_norm_layers_follow_the_formula_and_lycoris(sd15_pipe, tmp_path):
    pipe = sd15_pipe
    path, sd = _file(pipe, tmp_path)
    adapter = load_adapter(path)
    assert kind_label(adapter) == "norm" and {d.kind for d in adapter.deltas.values()} == {"norm"}
    assert set(adapter.deltas) == {f"{c}.{p}" for c, p in LAYERS.values()}
    mods = {name: _module(pipe, *LAYERS[name]) for name in LAYERS}
    base = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in mods.items()}
    clean = {name: copy.deepcopy(m) for name, m in mods.items()}
    rt = LoraRuntime(pipe)
    rt.add(adapter)
    w = 0.6
    rt.set_weights(unet={adapter.name: w}, text={adapter.name: w})
    lycoris = pytest.importorskip("lycoris.modules.norms")
    for fused in (False, True):
        if fused:
            rt.fuse()
        for name, m in mods.items():
            x = _input(m)
            want = _by_hand(m, x, *base[name], w * sd[f"{name}.w_norm"], w * sd[f"{name}.b_norm"])
            with torch.no_grad():
                got = m(x)
                ref = lycoris.NormModule.make_module_from_state_dict(
                    name, clean[name], sd[f"{name}.w_norm"], sd[f"{name}.b_norm"]
                )
                ref.multiplier = w
                theirs = ref(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
            torch.testing.assert_close(got, theirs, atol=1e-5, rtol=1e-5, msg=name)
            assert not torch.allclose(want, clean[name](x), atol=1e-3)
    rt.clear()
    for name, m in mods.items():
        assert torch.equal(m.weight, base[name][0]) and torch.equal(m.bias, base[name][1])


def test_a_norm_diff_of_the_wrong_size_is_refused_in_one_line(sd15_pipe, tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_norm1"
    p = tmp_path / "bad.safetensors"
    save_file({f"{name}.w_norm": torch.zeros(3), f"{name}.b_norm": torch.zeros(4)}, str(p))
    with pytest.raises(AdapterLoadError, match=f"{name}.b_norm"):
        load_adapter(p)
    save_file({f"{name}.w_norm": torch.zeros(7)}, str(p))
    rt = LoraRuntime(sd15_pipe)
    with pytest.raises(ComposerError, match="norm weight diff has 7 values") as info:
        rt.add(load_adapter(p))
    assert "\n" not in str(info.value) and not rt.layers
