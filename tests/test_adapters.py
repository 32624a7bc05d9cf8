"""lora_composer.adapters: LoRA files -> canonical Adapter, checked against diffusers/PEFT themselves."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lora_composer import tiny
from lora_composer.adapters import (
    Adapter,
    AdapterMetadata,
    LayerDelta,
    detect_family,
    load_adapter,
    resolve_module,
    save_adapter,
)
from lora_composer.errors import AdapterLoadError


def effective(d: LayerDelta) -> torch.Tensor:
    """alpha/r * up @ down, as a [out, in*kh*kw] matrix."""
    return d.scale * (d.up.flatten(1).double() @ d.down.flatten(1).double())


def peft_deltas(pipe, path, adapter="a") -> dict[str, torch.Tensor]:
    """What diffusers/PEFT applies per wrapped module after ``load_lora_weights`` (canonical keys)."""
    from peft.tuners.lora import LoraLayer

    pipe.load_lora_weights(str(path), adapter_name=adapter)
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                a = module.lora_A[adapter].weight.flatten(1).double()
                b = module.lora_B[adapter].weight.flatten(1).double()
                name = name.removeprefix("text_model.")
                out[f"{comp}.{name}"] = b @ a * module.scaling[adapter]
    return out


def assert_same_effect(x: Adapter, y: Adapter, tol=1e-6):
    assert set(x.deltas) == set(y.deltas)
    for k in x.deltas:
        torch.testing.assert_close(effective(x.deltas[k]), effective(y.deltas[k]), atol=tol, rtol=0, msg=k)


def fused_weights(pipe, path) -> dict[str, torch.Tensor]:
    pipe.load_lora_weights(str(path), adapter_name="f")
    pipe.fuse_lora(
        components=["unet", "text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_2") else [])
    )
    pipe.unload_lora_weights()
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None:
            out.update({f"{comp}.{k}": v.clone() for k, v in model.state_dict().items()})
    return out


# ----------------------------------------------------------------------------- formats agree


@pytest.mark.parametrize("alpha", [None, 2.0])
def test_kohya_and_diffusers_files_load_to_same_deltas_sd15(sd15_pipe, make_lora, alpha):
    d = load_adapter(make_lora(sd15_pipe, "d", fmt="diffusers", alpha=alpha, conv=True))
    k = load_adapter(make_lora(sd15_pipe, "k", fmt="kohya", alpha=alpha, conv=True))
    assert d.metadata.source_format == "diffusers" and k.metadata.source_format == "kohya"
    assert any(delta.is_conv for delta in k.deltas.values())
    assert_same_effect(d, k)
    expected_alpha = 4.0 if alpha is None else alpha
    assert {delta.alpha for delta in d.deltas.values()} == {expected_alpha}
    assert {delta.alpha for delta in k.deltas.values()} == {expected_alpha}


def test_kohya_and_diffusers_files_load_to_same_deltas_sdxl(sdxl_pipe, make_lora):
    d = load_adapter(make_lora(sdxl_pipe, "d", fmt="diffusers", alpha=8))
    k = load_adapter(make_lora(sdxl_pipe, "k", fmt="kohya", alpha=8))
    assert d.components() == k.components() == {"unet", "text_encoder", "text_encoder_2"}
    assert_same_effect(d, k)


def test_canonical_keys_name_pipeline_modules(sdxl_pipe, make_lora):
    a = load_adapter(make_lora(sdxl_pipe, "k", fmt="kohya", conv=True))
    layers = tiny.random_lora_layers(sdxl_pipe, conv=True)
    expected = {f"{c}.{k.rsplit('.lora_', 1)[0].removeprefix('text_model.')}" for c, sd in layers.items() for k in sd}
    assert set(a.deltas) == expected
    for key, d in a.deltas.items():
        assert not key.split(".", 1)[1].startswith("text_model.")
        module = resolve_module(sdxl_pipe, key)
        assert isinstance(module, torch.nn.Conv2d if d.is_conv else torch.nn.Linear)
        shape = (module.out_channels, module.in_channels) if d.is_conv else (module.out_features, module.in_features)
        assert (d.up.shape[0], d.down.shape[1]) == shape


# ----------------------------------------------------------------------------- agrees with diffusers/PEFT


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("alpha", [None, 2.0, 12.0])
def test_effective_delta_matches_peft_sd15(sd15_pipe, make_lora, fmt, alpha):
    path = make_lora(sd15_pipe, "x", fmt=fmt, alpha=alpha, conv=True)
    ours = load_adapter(path)
    ref = peft_deltas(sd15_pipe, path)
    assert set(ref) == set(ours.deltas)
    for key, d in ours.deltas.items():
        torch.testing.assert_close(effective(d), ref[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_effective_delta_matches_peft_sdxl(sdxl_pipe, make_lora, fmt):
    path = make_lora(sdxl_pipe, "x", fmt=fmt, alpha=3.0)
    ours = load_adapter(path)
    ref = peft_deltas(sdxl_pipe, path)
    assert set(ref) == set(ours.deltas)
    for key, d in ours.deltas.items():
        torch.testing.assert_close(effective(d), ref[key], atol=1e-6, rtol=0, msg=key)


def test_dtype_is_kept(sd15_pipe, tmp_path):
    layers = tiny.random_lora_layers(sd15_pipe)
    half = {c: {k: v.half() for k, v in sd.items()} for c, sd in layers.items()}
    a = load_adapter(tiny.save_kohya_lora(half, tmp_path / "h.safetensors"))
    assert {d.down.dtype for d in a.deltas.values()} == {torch.float16}


def test_older_diffusers_key_spellings(tmp_path):
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)
    conv_down, conv_up = torch.randn(2, 8, 3, 3, generator=gen), torch.randn(16, 2, 1, 1, generator=gen)
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up,
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": conv_down,
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": conv_up,
        "unet.down_blocks.0.resnets.0.conv1.alpha": torch.tensor(1.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": down,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": up,
    }
    save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / "old.safetensors"))
    a = load_adapter(tmp_path / "old.safetensors")
    assert set(a.deltas) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.resnets.0.conv1",
        "text_encoder.encoder.layers.0.self_attn.out_proj",
        "text_encoder.encoder.layers.0.mlp.fc1",
    }
    assert a.deltas["unet.down_blocks.0.resnets.0.conv1"].alpha == 1.0
    assert a.deltas["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].alpha == 4.0
    assert a.metadata.source_format == "diffusers"


def test_sgm_block_names_of_sdxl_kohya_files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {}
    names = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 640),
        "lora_unet_input_blocks_8_1_transformer_blocks_3_attn1_to_q": (1280, 1280),
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": (2048, 1280),
        "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2": (5120, 1280),
    }
    for n, (i, o) in names.items():
        sd[f"{n}.lora_down.weight"] = torch.randn(4, i, generator=gen)
        sd[f"{n}.lora_up.weight"] = torch.randn(o, 4, generator=gen)
        sd[f"{n}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(tmp_path / "sgm.safetensors"))
    a = load_adapter(tmp_path / "sgm.safetensors")
    assert set(a.deltas) == {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "unet.down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_q",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
        "unet.up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2",
    }
    assert a.family == "sdxl"
    d = a.deltas["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    src = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    torch.testing.assert_close(d.up @ d.down * 0.5, sd[f"{src}.lora_up.weight"] @ sd[f"{src}.lora_down.weight"] * 0.5)


def test_kohya_flux_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 3072, generator=gen), torch.randn(3072, 4, generator=gen)
    sd = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down,
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up,
        "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(8.0),
    }
    save_file(sd, str(tmp_path / "flux.safetensors"))
    a = load_adapter(tmp_path / "flux.safetensors")
    assert a.family == "flux" and a.metadata.source_format == "kohya"
    (key,) = a.deltas
    assert key == "transformer.transformer_blocks.0.attn.to_out.0"
    torch.testing.assert_close(effective(a.deltas[key]), 2.0 * (up.double() @ down.double()))


# ----------------------------------------------------------------------------- family


def _delta(inp, out=320, rank=4):
    return LayerDelta(torch.zeros(rank, inp), torch.zeros(out, rank), float(rank))


@pytest.mark.parametrize("width, family", [(768, "sd15"), (1024, "sd2"), (2048, "sdxl")])
def test_family_from_real_cross_attention_widths(width, family):
    deltas = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": _delta(width, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": _delta(640, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": _delta(640, 640),
    }
    assert detect_family(deltas) == family


def test_family_flux_sdxl_markers_and_unknown():
    assert detect_family({"transformer.single_transformer_blocks.0.attn.to_q": _delta(3072)}) == "flux"
    assert detect_family({}, keys=["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "flux"
    assert detect_family({"unet.add_embedding.linear_1": _delta(2816, 1280)}) == "sdxl"
    assert detect_family({"text_encoder_2.encoder.layers.0.self_attn.q_proj": _delta(1280, 1280)}) == "sdxl"
    assert detect_family({"text_encoder.encoder.layers.0.self_attn.q_proj": _delta(1024, 1024)}) == "sd2"
    assert detect_family({"vae.encoder.conv_in": _delta(3)}) == "unknown"


def test_family_of_tiny_models(sd15_pipe, sdxl_pipe, make_lora):
    assert load_adapter(make_lora(sd15_pipe, "a", fmt="kohya")).family == "sd15"
    assert load_adapter(make_lora(sd15_pipe, "b", text_encoder=False)).family == "sd15"
    assert load_adapter(make_lora(sdxl_pipe, "c", fmt="kohya")).family == "sdxl"
    # No second text encoder and a 64-wide cross-attention: SDXL's several transformer blocks tell.
    assert load_adapter(make_lora(sdxl_pipe, "d", text_encoder=False)).family == "sdxl"


# ----------------------------------------------------------------------------- metadata


def test_trigger_words_description_weight(sd15_pipe, make_lora, tmp_path):
    tags = {
        "10_ds": {"blue hair": 3, "sks woman": 10, "smile": 1},
        "5_more": {"blue hair": 9, "hat": 2, "x": 1, "y": 1},
    }
    path = make_lora(
        sd15_pipe,
        "styled",
        fmt="kohya",
        metadata={
            "ss_tag_frequency": json.dumps(tags),
            "modelspec.trigger_phrase": "foo, bar",
            "ss_output_name": "styled_v2",
        },
    )
    (tmp_path / "styled.json").write_text(
        json.dumps({"activation text": "sks person", "description": "A style.", "preferred weight": 0.8})
    )
    (tmp_path / "styled.civitai.info").write_text(
        json.dumps({"trainedWords": ["zzz, yyy", "foo"], "description": "other"})
    )
    a = load_adapter(path)
    # kohya tags: only those at least half as frequent as the top one (blue hair 12, sks woman 10; hat 2 is not)
    assert a.metadata.trigger_words == ["sks person", "zzz", "yyy", "foo", "bar", "blue hair", "sks woman"]
    assert "styled_v2" not in a.metadata.trigger_words
    assert a.metadata.description == "A style."
    assert a.metadata.preferred_weight == 0.8
    assert a.metadata.file_metadata["ss_output_name"] == "styled_v2"
    import hashlib

    assert a.metadata.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert a.name == "styled" and a.path == str(path.resolve())
    assert load_adapter(path, name="other").name == "other"


def test_no_metadata_gives_empty_fields(sd15_pipe, make_lora):
    a = load_adapter(make_lora(sd15_pipe, "plain", fmt="kohya"))
    assert a.metadata.trigger_words == [] and a.metadata.description == "" and a.metadata.preferred_weight is None


# ----------------------------------------------------------------------------- bad input


def _kohya_pair(name="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", r=4, r_up=4):
    return {f"{name}.lora_down.weight": torch.randn(r, 32), f"{name}.lora_up.weight": torch.randn(32, r_up)}


def _bad_files(tmp_path):
    cases = {}

    def tensors(name, sd, expect):
        p = tmp_path / f"{name}.safetensors"
        save_file(sd, str(p))
        cases[name] = (p, expect)

    cases["missing"] = (tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "folder.safetensors").mkdir()
    cases["directory"] = (tmp_path / "folder.safetensors", "directory")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.safetensors", "empty")
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    cases["garbage"] = (tmp_path / "garbage.safetensors", "safetensors")
    good = tmp_path / "good.safetensors"
    save_file(_kohya_pair(), str(good))
    raw = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    cases["truncated"] = (tmp_path / "truncated.safetensors", "truncated")
    torch.save(_kohya_pair(), tmp_path / "pickled.pt")
    cases["pickle"] = (tmp_path / "pickled.pt", "allow_pickle")
    sd = _kohya_pair()
    sd.pop(next(k for k in sd if "lora_up" in k))
    tensors("noup", sd, "no up weight")
    tensors("rank", _kohya_pair(r=4, r_up=3), "rank mismatch")
    nan = _kohya_pair()
    nan[next(k for k in nan if "lora_up" in k)][3, 1] = float("nan")
    tensors("nan", nan, "attn1.to_q has NaN or inf")
    inf = _kohya_pair()
    inf[next(k for k in inf if "lora_down" in k)][0, 0] = float("inf")
    tensors("inf", inf, "NaN or inf")
    tensors(
        "unknown",
        {"model.diffusion_model.foo.weight": torch.zeros(2)},
        "unknown key format (key 'model.diffusion_model.foo.weight')",
    )
    tensors(
        "loha",
        {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
        "lora_unet_x.hada_w2_a missing",
    )
    tensors("lokr", {"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, "lora_unet_x.lokr_w2_a missing")
    dora = _kohya_pair()
    dora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.full(
        (32, 1), float("nan")
    )
    tensors("dora", dora, "attn1.to_q has NaN or inf values in its magnitude")
    tensors(
        "oft",
        {"lora_unet_x.oft_blocks": torch.zeros(2, 2, 3), "lora_unet_x.alpha": torch.tensor(1.0)},
        "oft_blocks: expected [blocks, b, b] (OFT) or [stages, blocks, b, b] (BOFT), got shape (2, 2, 3)",
    )
    tensors("peft-old-oft", {"unet.x.oft_r": torch.zeros(2, 4, 4)}, "PEFT OFT from before PEFT 0.14 (oft_r")
    tensors("nolayers", {}, "no tensors")
    return cases


def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path):
    cases = _bad_files(tmp_path)
    for name, (path, expect) in cases.items():
        with pytest.raises(AdapterLoadError) as info:
            load_adapter(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: "), (name, msg)
        assert "\n" not in msg, (name, msg)
        assert expect in msg, (name, msg)
    for name in ("peft-old-oft",):
        assert "not supported yet" in str(pytest.raises(AdapterLoadError, load_adapter, cases[name][0]).value)


def test_pickle_is_never_unpickled_without_consent(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    torch.save(_kohya_pair(), path)

    def boom(*a, **k):
        raise AssertionError("torch.load called")

    with monkeypatch.context() as m:
        m.setattr(torch, "load", boom)
        with pytest.raises(AdapterLoadError, match="allow_pickle"):
            load_adapter(path)
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    a = load_adapter(path, allow_pickle=True)
    assert calls == [True]
    assert list(a.deltas) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]


# ----------------------------------------------------------------------------- save


def test_round_trip_keeps_deltas_and_metadata(sdxl_pipe, make_lora, tmp_path):
    src = make_lora(sdxl_pipe, "src", fmt="kohya", alpha=2.0, metadata={"modelspec.trigger_phrase": "sks dog, red"})
    (tmp_path / "src.json").write_text(
        json.dumps({"activation text": "hat", "description": "d", "preferred weight": 0.7})
    )
    a = load_adapter(src)
    out = save_adapter(a, tmp_path / "out" / "saved.safetensors")
    b = load_adapter(out, name=a.name)
    assert b.metadata.source_format == "diffusers"
    assert set(a.deltas) == set(b.deltas)
    for k, d in a.deltas.items():
        assert (
            torch.equal(d.down, b.deltas[k].down) and torch.equal(d.up, b.deltas[k].up) and d.alpha == b.deltas[k].alpha
        )
    assert b.metadata.trigger_words == a.metadata.trigger_words == ["hat", "sks dog", "red"]
    assert (b.metadata.description, b.metadata.preferred_weight, b.family) == ("d", 0.7, "sdxl")
    assert save_adapter(b, tmp_path / "out") == tmp_path / "out" / "src.safetensors"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_loads_our_file_like_the_original(sd15_pipe, make_lora, tmp_path, fmt):
    src = make_lora(sd15_pipe, "src", fmt=fmt, alpha=2.0, conv=True)
    ours = save_adapter(load_adapter(src), tmp_path / "ours.safetensors")
    base = {k: v.clone() for k, v in sd15_pipe.unet.state_dict().items()}
    want = fused_weights(copy.deepcopy(sd15_pipe), src)
    got = fused_weights(sd15_pipe, ours)
    assert any(not torch.equal(want[f"unet.{k}"], v) for k, v in base.items())  # the LoRA did something
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_mixed_ranks_and_alphas_survive_diffusers(sdxl_pipe, make_lora, tmp_path):
    a = load_adapter(make_lora(sdxl_pipe, "m", fmt="kohya"))
    for i, (k, d) in enumerate(sorted(a.deltas.items())):
        if i % 3 == 0:
            a.deltas[k] = LayerDelta(d.down[:2].clone(), d.up[:, :2].clone(), 1.0)  # rank 2, alpha 1
        elif i % 3 == 1:
            d.alpha = 7.5
    path = save_adapter(a, tmp_path / "mixed.safetensors")
    assert load_adapter(path).ranks == {2, 4}
    ref = peft_deltas(sdxl_pipe, path)
    assert set(ref) == set(a.deltas)
    for key, d in a.deltas.items():
        torch.testing.assert_close(effective(d), ref[key], atol=1e-6, rtol=0, msg=key)


def test_save_refuses_other_extensions(tmp_path):
    a = Adapter(
        "x",
        "sd15",
        {"unet.conv_in": LayerDelta(torch.ones(1, 4, 3, 3), torch.ones(8, 1, 1, 1), 1.0)},
        AdapterMetadata(),
    )
    with pytest.raises(ValueError):
        save_adapter(a, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_every_delta_kind_answers_the_delta_protocol():
    """Code reads ``kind`` / ``additive`` / ``is_sparse`` from any layer delta instead of probing its type."""
    from lora_composer.adapters import kinds
    from lora_composer.adapters.types import LayerDelta, SparseDelta

    classes = [
        LayerDelta,
        SparseDelta,
        kinds.LoHaDelta,
        kinds.LoKrDelta,
        kinds.FullDelta,
        kinds.DoRADelta,
        kinds.IA3Delta,
        kinds.GLoRADelta,
        kinds.OFTDelta,
        kinds.NormDelta,
    ]
    for cls in classes:
        assert isinstance(cls.kind, str) and isinstance(cls.additive, bool) and isinstance(cls.is_sparse, bool), cls
    assert sorted(cls.kind for cls in classes) == sorted([*kinds.KINDS, "shira"])
    assert [cls.kind for cls in classes if not cls.additive] == ["dora", "ia3", "glora", "oft", "norm"]
    assert [cls.kind for cls in classes if cls.is_sparse] == ["shira"]


def test_save_attn_procs_files_without_the_unet_prefix(tmp_path):
    """``UNet2DConditionModel.save_attn_procs`` writes the UNet's keys without ``unet.``: they load as the same
    file with the prefix does."""
    gen = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)
    sd = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up,
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": down.clone(),
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": up.clone(),
    }
    save_file(sd, str(tmp_path / "procs.safetensors"))
    save_file({f"unet.{k}": v for k, v in sd.items()}, str(tmp_path / "prefixed.safetensors"))
    got, want = load_adapter(tmp_path / "procs.safetensors"), load_adapter(tmp_path / "prefixed.safetensors")
    assert (
        set(got.deltas)
        == set(want.deltas)
        == {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        }
    )
    for key, d in want.deltas.items():
        assert torch.equal(got.deltas[key].down, d.down) and torch.equal(got.deltas[key].up, d.up)
        assert got.deltas[key].alpha == d.alpha
