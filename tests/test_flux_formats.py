"""FLUX LoRA files: kohya sd-scripts keys (double and single blocks, final layer, CLIP and T5) against diffusers'
loading of the same factors in diffusers keys (and PEFT on T5, which diffusers does not load); wrong-model
and malformed files refused in one line, leaving what was attached untouched."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_composer import tiny, tiny_dit
from lora_composer.adapters import load_adapter
from lora_composer.errors import ComposerError
from lora_composer.pipeline import ComposerPipeline

PROMPT = "a red circle"
CALL = dict(num_inference_steps=2, height=16, width=16, output_type="np", max_sequence_length=16, guidance_scale=3.5)
BLOCKS = ("transformer_blocks", "single_transformer_blocks", "proj_out", "norm_out")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny DiT layers run on one thread


@pytest.fixture(scope="module")
def template(one_thread):
    return tiny_dit.build_tiny_flux_pipeline(seed=0)


@pytest.fixture
def pipe(template):
    return copy.deepcopy(template)


def _layers(pipe, seed, shared_down, text_encoders=("text_encoder",)):
    layers = tiny_dit.random_dit_lora_layers(
        pipe, rank=4, seed=seed, shared_down=shared_down, text_encoders=text_encoders
    )
    # what kohya files hold: the blocks, the final layer and the text encoders (no embedders)
    layers["transformer"] = {k: v for k, v in layers["transformer"].items() if k.startswith(BLOCKS)}
    return layers


def _render(pipe, **kwargs):
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs}).images


@pytest.mark.parametrize("shared_down", [True, False], ids=["sd-scripts-fused", "block-diagonal"])
def test_kohya_flux_merge_matches_diffusers(pipe, tmp_path, shared_down):
    """Two kohya files (double + single blocks, final layer, CLIP; alphas 8 and 4 at rank 4) at (0.7, 0.3)
    equal diffusers' load_lora_weights + set_adapters of the same factors written in diffusers keys."""
    weights, kohya, ref = [0.7, 0.3], [], copy.deepcopy(pipe)
    for i, (name, alpha) in enumerate((("a", 8), ("b", 4))):
        layers = _layers(pipe, seed=i + 1, shared_down=shared_down)
        diffusers_file = tiny_dit.save_dit_diffusers_lora(pipe, layers, tmp_path / f"{name}-d.safetensors", 4, alpha)
        kohya.append(tiny_dit.save_flux_kohya_lora(layers, tmp_path / f"{name}.safetensors", 4, alpha))
        ref.load_lora_weights(str(diffusers_file), adapter_name=name)
    ref.set_adapters(["a", "b"], weights)
    expected = _render(ref)

    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = composer(PROMPT, loras=list(zip(kohya, weights)), seed=0, progress=False, **CALL)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(expected - _render(pipe)).max() > 1e-2
    ad = composer.adapters["a"]
    assert ad.family == "flux" and ad.metadata.source_format == "kohya"
    single = "transformer.single_transformer_blocks.0"
    assert {f"{single}.attn.to_q", f"{single}.proj_mlp", "transformer.norm_out.linear"} <= set(ad.deltas)
    # a block-diagonal fused layer keeps each part's rank; a shared down weight is shared
    assert ad.deltas[f"{single}.proj_mlp"].rank == 4


def test_kohya_double_blocks_match_diffusers_reading_the_same_file(pipe, tmp_path):
    """Double blocks and CLIP only: diffusers reads the kohya file itself (its converter is right there)."""
    layers = _layers(pipe, seed=3, shared_down=True)
    layers["transformer"] = {k: v for k, v in layers["transformer"].items() if k.startswith("transformer_blocks")}
    path = tiny_dit.save_flux_kohya_lora(layers, tmp_path / "double.safetensors", 4, alpha=2)
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path), adapter_name="a")
    ref.set_adapters(["a"], [0.8])
    got = ComposerPipeline(copy.deepcopy(pipe))(PROMPT, loras=[(path, 0.8)], seed=0, progress=False, **CALL)
    assert np.abs(got - _render(ref)).max() < 1e-4


def test_kohya_flux_t5_keys_match_peft(pipe, tmp_path):
    """T5 keys (lora_te2_encoder_block_...), which diffusers drops: against PEFT's LoRA on the T5 encoder."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    layers = _layers(pipe, seed=4, shared_down=False, text_encoders=("text_encoder", "text_encoder_2"))
    assert layers["text_encoder_2"]
    path = tiny_dit.save_flux_kohya_lora(layers, tmp_path / "t5.safetensors", 4, alpha=8)
    w = 0.7
    ref = copy.deepcopy(pipe)
    rest = {k: v for k, v in layers.items() if k != "text_encoder_2"}
    rest_file = tiny_dit.save_dit_diffusers_lora(pipe, rest, tmp_path / "rest.safetensors", 4, 8)
    ref.load_lora_weights(str(rest_file), adapter_name="a")
    ref.set_adapters(["a"], [w])
    t5 = layers["text_encoder_2"]
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in t5})
    config = LoraConfig(r=4, lora_alpha=8 * w, target_modules=targets)  # weight w: alpha scaled by w
    inject_adapter_in_model(config, ref.text_encoder_2, adapter_name="t5")
    named = {k.replace(".weight", ".t5.weight"): v for k, v in t5.items()}
    set_peft_model_state_dict(ref.text_encoder_2, named, adapter_name="t5")
    expected = _render(ref)

    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = composer(PROMPT, loras=[(path, w)], seed=0, progress=False, **CALL)
    assert {k.split(".")[0] for k in composer.runtime.layers} == {"transformer", "text_encoder", "text_encoder_2"}
    assert np.abs(got - expected).max() < 1e-4
    without_t5 = ComposerPipeline(copy.deepcopy(pipe))
    nothing = without_t5(PROMPT, loras=[(tmp_path / "rest.safetensors", w)], seed=0, progress=False, **CALL)
    assert np.abs(expected - nothing).max() > 1e-3  # the T5 part matters


def _sd15_file(tmp_path, fmt):
    sd15 = tiny.build_tiny_sd15_pipeline(seed=0)
    layers = tiny.random_lora_layers(sd15, rank=4, seed=1)
    if fmt == "kohya":
        return tiny.save_kohya_lora(layers, tmp_path / "sd15-kohya.safetensors", alpha=4)
    return tiny.save_diffusers_lora(sd15, layers, tmp_path / "sd15.safetensors", rank=4)


def _flux_file(pipe, tmp_path):
    layers = _layers(pipe, seed=1, shared_down=True)
    return tiny_dit.save_flux_kohya_lora(layers, tmp_path / "good.safetensors", 4)


def _bad_files(pipe, tmp_path):
    """(file, words its one-line error must contain)."""
    gen = torch.Generator().manual_seed(0)
    out = [(_sd15_file(tmp_path, "kohya"), ["sd15", "flux"]), (_sd15_file(tmp_path, "diffusers"), ["sd15", "flux"])]
    dev = {  # a FLUX.1-dev layer (width 3072) on the tiny model
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 3072, generator=gen),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(3072, 2, generator=gen),
    }
    seven = {  # a fused single-block layer whose rows are not 7 x width
        "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 32, generator=gen),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(100, 2, generator=gen),
    }
    unknown = {  # a layer diffusers' converter would drop with a log line
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 32, generator=gen),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, 2, generator=gen),
        "lora_unet_double_blocks_0_img_norm_x.lora_down.weight": torch.randn(2, 32, generator=gen),
        "lora_unet_double_blocks_0_img_norm_x.lora_up.weight": torch.randn(32, 2, generator=gen),
    }
    t5 = {
        "lora_te2_encoder_block_0_layer_0_Mystery_q.lora_down.weight": torch.randn(2, 32, generator=gen),
        "lora_te2_encoder_block_0_layer_0_Mystery_q.lora_up.weight": torch.randn(32, 2, generator=gen),
        **seven,
    }
    for name, sd, words in (
        ("dev", dev, ["3072", "to_out.0"]),
        ("seven", seven, ["linear1", "7 x width"]),
        ("unknown", unknown, ["img_norm_x"]),
        ("t5", t5, ["Mystery"]),
    ):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        out.append((tmp_path / f"{name}.safetensors", words))
    return out


def test_wrong_model_and_malformed_files_fail_in_one_line(pipe, tmp_path):
    composer = ComposerPipeline(pipe)
    good = _flux_file(pipe, tmp_path)
    before = composer(PROMPT, loras=[(good, 0.8)], seed=0, progress=False, **CALL)
    layers = {k: (layer.down.clone(), layer.module.weight.clone()) for k, layer in composer.runtime.layers.items()}
    for path, words in _bad_files(pipe, tmp_path):
        with pytest.raises(ComposerError) as err:
            composer(PROMPT, loras=[(good, 0.8), (path, 1.0)], seed=0, progress=False, **CALL)
        message = str(err.value)
        assert "\n" not in message and path.name in message, message
        assert all(w in message for w in words), message
        # nothing half-attached: the good adapter alone, its layers as they were
        assert list(composer.adapters) == ["good"] and set(composer.runtime.layers) == set(layers)
        for k, (down, weight) in layers.items():
            assert torch.equal(composer.runtime.layers[k].down, down)
            assert torch.equal(composer.runtime.layers[k].module.weight, weight)
    assert np.array_equal(composer(PROMPT, loras=[(good, 0.8)], seed=0, progress=False, **CALL), before)


def test_kohya_flux_parse_is_pure_and_keeps_alphas(tmp_path, template):
    """Own conversions keep alpha as alpha (not baked); the final layer's halves swap to diffusers' order."""
    layers = _layers(template, seed=5, shared_down=True)
    path = tiny_dit.save_flux_kohya_lora(layers, tmp_path / "k.safetensors", 4, alpha=2)
    ad = load_adapter(path)
    single = ad.deltas["transformer.single_transformer_blocks.0.attn.to_k"]
    assert single.alpha == 2 and single.rank == 4
    src = layers["transformer"]
    torch.testing.assert_close(single.up, src["single_transformer_blocks.0.attn.to_k.lora_B.weight"])
    norm = ad.deltas["transformer.norm_out.linear"]
    torch.testing.assert_close(norm.up, src["norm_out.linear.lora_B.weight"])


def test_xlabs_flux_matches_diffusers_reading_the_same_file(pipe, tmp_path):
    paths = [
        tiny_dit.save_flux_xlabs_lora(_layers(pipe, seed=i + 6, shared_down=True), tmp_path / f"x{i}.safetensors")
        for i in range(2)
    ]
    weights = [0.7, 0.3]
    ref = copy.deepcopy(pipe)
    for i, path in enumerate(paths):
        ref.load_lora_weights(str(path), adapter_name=f"x{i}")
    ref.set_adapters(["x0", "x1"], weights)
    expected = _render(ref)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = composer(PROMPT, loras=list(zip(paths, weights)), seed=0, progress=False, **CALL)
    assert np.abs(got - expected).max() < 1e-4 and np.abs(expected - _render(pipe)).max() > 1e-3  # attention only
    ad = composer.adapters["x0"]
    assert ad.family == "flux" and ad.metadata.source_format == "xlabs"
    assert "transformer.single_transformer_blocks.0.attn.to_v" in ad.deltas and len(ad.deltas) == 11


# -- other trainers' layouts: BFL / ComfyUI names and OneTrainer ------------------------------------------

# kohya's FLUX layer names are BFL's module names spelled with underscores; this is BFL's spelling of each
BFL = {
    "img_attn_qkv": "img_attn.qkv",
    "img_attn_proj": "img_attn.proj",
    "img_mlp_0": "img_mlp.0",
    "img_mlp_2": "img_mlp.2",
    "img_mod_lin": "img_mod.lin",
    "txt_attn_qkv": "txt_attn.qkv",
    "txt_attn_proj": "txt_attn.proj",
    "txt_mlp_0": "txt_mlp.0",
    "txt_mlp_2": "txt_mlp.2",
    "txt_mod_lin": "txt_mod.lin",
    "linear1": "linear1",
    "linear2": "linear2",
    "modulation_lin": "modulation.lin",
}


def _bfl_name(kohya_layer: str) -> str:
    rest = kohya_layer.removeprefix("lora_unet_")
    if rest.startswith("final_layer_"):
        return {
            "final_layer_linear": "final_layer.linear",
            "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
        }[rest]
    kind, _, tail = rest.partition("_blocks_")
    index, _, layer = tail.partition("_")
    return f"{kind}_blocks.{index}.{BFL[layer]}"


def _same_deltas(got, want):
    assert set(got.deltas) == set(want.deltas)
    for module, d in want.deltas.items():
        g = got.deltas[module]
        expected, actual = d.scale * d.up @ d.down, g.scale * g.up @ g.down
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max())), module


@pytest.mark.parametrize("spelling", ["diffusion_model+lora_A", "lora_down+alpha", "base_model.model+lora_A"])
def test_bfl_comfyui_names_load_as_their_kohya_twin(pipe, tmp_path, spelling):
    """Files named after BFL's modules (what ComfyUI and several trainers write) load as the same factors in
    kohya keys do (those equal diffusers: the tests above), fused q, k, v split and alphas kept."""
    layers = _layers(pipe, seed=5, shared_down=False, text_encoders=())
    kohya_path = tiny_dit.save_flux_kohya_lora(layers, tmp_path / "kohya.safetensors", 4, alpha=2)
    from safetensors.torch import load_file

    kohya = load_file(str(kohya_path))
    bfl = {}
    prefix = {
        "diffusion_model+lora_A": "diffusion_model.",
        "lora_down+alpha": "diffusion_model.",
        "base_model.model+lora_A": "base_model.model.",
    }[spelling]
    for key, value in kohya.items():
        layer, _, suffix = key.partition(".")
        if spelling.endswith("lora_A"):
            if suffix == "alpha":
                continue  # PEFT-style files carry no alphas: fold alpha / rank into the up weight
            if suffix == "lora_up.weight":
                value = value * float(kohya[f"{layer}.alpha"]) / kohya[f"{layer}.lora_down.weight"].shape[0]
            suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[suffix]
        bfl[f"{prefix}{_bfl_name(layer)}.{suffix}"] = value
    save_file(bfl, str(tmp_path / "bfl.safetensors"))
    got, want = load_adapter(tmp_path / "bfl.safetensors"), load_adapter(kohya_path)
    assert got.family == "flux" and got.metadata.source_format == "bfl"
    _same_deltas(got, want)


def test_onetrainer_names_load_as_the_same_factors_in_diffusers_keys(pipe, tmp_path):
    """OneTrainer's ``lora_transformer_<diffusers module with underscores>`` keys (embedders included) and kohya
    CLIP keys load as the same factors written in diffusers keys by the pipeline's own save_lora_weights."""
    targets = (*tiny_dit.FLUX_TARGETS, "x_embedder", "context_embedder", "linear_1", "linear_2")
    layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=6, targets=targets)
    assert any(k.startswith("x_embedder") for k in layers["transformer"])
    assert any(k.startswith("time_text_embed") for k in layers["transformer"])
    want = load_adapter(tiny_dit.save_dit_diffusers_lora(pipe, layers, tmp_path / "d.safetensors", 4, alpha=8))
    kohya_te = load_file_of(
        tiny_dit.save_flux_kohya_lora({"text_encoder": layers["text_encoder"]}, tmp_path / "te.safetensors", 4, alpha=8)
    )
    onetrainer = dict(kohya_te)
    for key, value in layers["transformer"].items():
        module, _, which = key.rpartition(".lora_")
        name = "lora_transformer_" + module.replace(".", "_")
        onetrainer[f"{name}.{'lora_down' if which == 'A.weight' else 'lora_up'}.weight"] = value
        onetrainer[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(onetrainer, str(tmp_path / "onetrainer.safetensors"))
    got = load_adapter(tmp_path / "onetrainer.safetensors")
    assert got.metadata.source_format == "onetrainer"
    _same_deltas(got, want)
    onetrainer["lora_transformer_transformer_blocks_0_attn_to_qq.alpha"] = torch.tensor(1.0)
    save_file(onetrainer, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ComposerError, match="unknown key format in OneTrainer FLUX LoRA .*to_qq.alpha"):
        load_adapter(tmp_path / "odd.safetensors")


def load_file_of(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_kohya_flux_embedders_load_beside_the_blocks(pipe, tmp_path):
    """kohya FLUX files that also train BFL's embedders (img_in, txt_in, time_in, vector_in, guidance_in): each
    is one Linear of diffusers' transformer, its delta alpha / rank * up @ down by hand; alone or beside the
    blocks they load as FLUX, attach, and act."""
    t = pipe.transformer
    embed = t.time_text_embed
    modules = {
        "img_in": ("x_embedder", t.x_embedder),
        "txt_in": ("context_embedder", t.context_embedder),
        "time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1", embed.timestep_embedder.linear_1),
        "time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2", embed.timestep_embedder.linear_2),
        "vector_in_in_layer": ("time_text_embed.text_embedder.linear_1", embed.text_embedder.linear_1),
        "vector_in_out_layer": ("time_text_embed.text_embedder.linear_2", embed.text_embedder.linear_2),
        "guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1", embed.guidance_embedder.linear_1),
        "guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2", embed.guidance_embedder.linear_2),
    }
    gen = torch.Generator().manual_seed(7)
    embedders, by_hand = {}, {}
    for i, (name, (module, linear)) in enumerate(modules.items()):
        down, up = torch.randn(4, linear.in_features, generator=gen), torch.randn(linear.out_features, 4, generator=gen)
        alpha = float(i + 1)
        embedders.update(
            {
                f"lora_unet_{name}.lora_down.weight": down,
                f"lora_unet_{name}.lora_up.weight": up,
                f"lora_unet_{name}.alpha": torch.tensor(alpha),
            }
        )
        by_hand[f"transformer.{module}"] = alpha / 4 * up @ down
    layers = _layers(pipe, seed=8, shared_down=True, text_encoders=())
    layers["transformer"] = {k: v for k, v in layers["transformer"].items() if k.startswith("transformer_blocks")}
    blocks = load_file_of(tiny_dit.save_flux_kohya_lora(layers, tmp_path / "blocks.safetensors", 4, alpha=2))
    for name, tensors in (("alone", embedders), ("beside", {**embedders, **blocks})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        ad = load_adapter(tmp_path / f"{name}.safetensors")
        assert ad.family == "flux", name
        for module, delta in by_hand.items():
            d = ad.deltas[module]
            assert torch.allclose(d.scale * d.up @ d.down, delta, rtol=1e-5, atol=1e-6), (name, module)
    assert len(ad.deltas) == len(by_hand) + len(load_adapter(tmp_path / "blocks.safetensors").deltas)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = composer(PROMPT, loras=[(tmp_path / "alone.safetensors", 0.5)], seed=0, progress=False, **CALL)
    assert np.abs(got - _render(pipe)).max() > 1e-3


def test_a_text_encoder_only_lora_fits_any_pipeline_whose_encoder_it_fits(pipe, tmp_path):
    """A FLUX LoRA that trains only CLIP (kohya ``lora_te1_*`` keys, no transformer layer) is not "a LoRA for
    sd15": it attaches to the FLUX pipeline whose CLIP it fits, acts, and a misfit still fails on its shapes."""
    layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=9, targets=("no-transformer-layer",))
    path = tiny_dit.save_flux_kohya_lora({"text_encoder": layers["text_encoder"]}, tmp_path / "clip.safetensors", 4)
    composer = ComposerPipeline(copy.deepcopy(pipe))
    got = composer(PROMPT, loras=[(path, 1.0)], seed=0, progress=False, **CALL)
    assert np.abs(got - _render(pipe)).max() > 1e-3
    sd15 = tiny.build_tiny_sd15_pipeline(seed=0)  # CLIP of another width: refused on the first layer's shape
    wide = tiny.save_kohya_lora(
        tiny.random_lora_layers(sd15, rank=4, seed=1, text_encoder=True), tmp_path / "w.safetensors"
    )
    text_only = {k: v for k, v in load_file_of(wide).items() if k.startswith("lora_te")}
    for k in list(text_only):  # make the text encoder layers twice as wide as the FLUX pipeline's CLIP
        if k.endswith("lora_down.weight"):
            text_only[k] = torch.randn(text_only[k].shape[0], 2 * text_only[k].shape[1])
    save_file(text_only, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ComposerError, match="wide.safetensors"):
        composer.load_lora(tmp_path / "wide.safetensors")
