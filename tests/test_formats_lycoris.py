"""LyCORIS and PEFT adapter kinds beyond (down, up): LoHa, LoKr, Tucker LoCon, DoRA, IA3, full/diff, GLoRA,
diagonal OFT, BOFT.

References: files are written by ``lycoris-lora`` (kohya keys) and PEFT (module keys) for the tiny SD1.5
pipeline; LyCORIS's own merge and PEFT's own forward are what our fused and unfused runtime must match.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lora_composer.adapters import LayerDelta, load_adapter
from lora_composer.adapters.kinds import kind_label
from lora_composer.errors import ComposerError
from lora_composer.pipeline import ComposerPipeline
from lora_composer.runtime import LoraRuntime

kohya = pytest.importorskip("lycoris.kohya")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
TOL = 1e-5
CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np", progress=False)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("lycoris") / "preset.toml"
    path.write_text(PRESET)
    return str(path)


def _randomise(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if "dora_scale" in name or "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "ia3_l" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def lycoris_file(pipe, preset, algo, path, dim=4, alpha=4.0, seed=1, merge=True, **kw):
    """Write a LyCORIS file for ``pipe`` (random weights); return (path, a copy of ``pipe`` with LyCORIS's
    merge applied, or with LyCORIS's network applied unmerged when ``merge`` is False)."""
    ref = copy.deepcopy(pipe)
    net = kohya.create_network(1.0, dim, alpha, ref.vae, ref.text_encoder, ref.unet, preset=preset, algo=algo, **kw)
    net.apply_to(ref.text_encoder, ref.unet, True, True)
    _randomise(net.named_parameters(), seed)
    net.save_weights(str(path), torch.float32, {})
    if algo == "full":  # its modules hold the absolute weight once applied: merge a fresh copy from the file
        from lycoris.utils.preset import read_preset

        ref = copy.deepcopy(pipe)
        kohya.LycorisNetworkKohya.apply_preset(read_preset(preset))
        net, sd = kohya.create_network_from_weights(1.0, str(path), ref.vae, ref.text_encoder, ref.unet)
        net.merge_to(ref.text_encoder, ref.unet, sd, torch.float32, "cpu")
    elif merge:
        for lora in net.loras:
            lora.merge_to(1.0)
            lora.restore()  # the merged weights alone, the module's own forward
    return path, ref


def _unet_inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    latents = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(batch, 6, cfg.cross_attention_dim, generator=g)
    return latents, torch.tensor([500] * batch), text


@torch.no_grad()
def _unet(pipe, inputs):
    return pipe.unet(*inputs).sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _worst_layer(ref, ours, base) -> tuple[float, int]:
    """Largest per-parameter relative error (Frobenius) of ``ours`` against ``ref``, and how many changed."""
    worst, changed = 0.0, 0
    for comp in ("unet", "text_encoder"):
        a = {k: v.detach() for k, v in getattr(ref, comp).named_parameters()}
        b = {k: v.detach() for k, v in getattr(ours, comp).named_parameters()}
        c = {k: v.detach() for k, v in getattr(base, comp).named_parameters()}
        for k, v in b.items():
            if k not in a:
                continue
            changed += int(not torch.equal(a[k], c[k]))
            worst = max(worst, float((a[k] - v).norm() / a[k].norm().clamp_min(1e-12)))
    return worst, changed


CASES = {
    "loha": ("loha", {}, "LoHaDelta"),
    "loha-tucker": ("loha", {"use_tucker": True}, "LoHaDelta"),
    "lokr-full-matrices": ("lokr", {}, "LoKrDelta"),
    "lokr-low-rank": ("lokr", {"factor": 2}, "LoKrDelta"),
    "lokr-tucker": ("lokr", {"factor": 2, "use_tucker": True}, "LoKrDelta"),
    "lokr-both-low-rank": ("lokr", {"factor": 8, "decompose_both": True, "dim": 1, "alpha": 1.0}, "LoKrDelta"),
    "locon-tucker": ("locon", {"use_tucker": True}, "LayerDelta"),
    "dora-locon": ("locon", {"dora_wd": True}, "DoRADelta"),
    "dora-locon-on-input": ("locon", {"dora_wd": True, "wd_on_output": False}, "DoRADelta"),
    "dora-loha": ("loha", {"dora_wd": True}, "DoRADelta"),
    "dora-lokr": ("lokr", {"dora_wd": True, "factor": 2}, "DoRADelta"),
    "ia3": ("ia3", {}, "IA3Delta"),
    "full": ("full", {}, "FullDelta"),
    "glora": ("glora", {}, "GLoRADelta"),
    "diag-oft": ("diag-oft", {}, "OFTDelta"),
    "diag-oft-constrained-rescaled": ("diag-oft", {"constraint": 1e-3, "rescaled": True}, "OFTDelta"),
    "boft": ("boft", {}, "OFTDelta"),
    "boft-constrained-rescaled": ("boft", {"constraint": 1e-3, "rescaled": True}, "OFTDelta"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_lycoris_merge_and_unfuse_restores(sd15_pipe, preset, tmp_path, case):
    algo, kw, kind = CASES[case]
    base = copy.deepcopy(sd15_pipe)
    if algo == "boft":  # butterflies need power-of-two output sizes: the tiny CLIP's MLP has 37
        preset = tmp_path / "boft.toml"
        preset.write_text(PRESET.replace(', "CLIPMLP"', ""))
    path, ref = lycoris_file(sd15_pipe, str(preset), algo, tmp_path / f"{case}.safetensors", **kw)
    adapter = load_adapter(path)
    assert {type(d).__name__ for d in adapter.deltas.values()} == {kind}
    label = {
        "loha": "LoHa",
        "lokr": "LoKr",
        "locon": "LoCon",
        "ia3": "IA3",
        "full": "full",
        "glora": "GLoRA",
        "diag-oft": "OFT",
        "boft": "BOFT",
    }[algo]
    assert kind_label(adapter) == ("DoRA" if "dora" in case else label)  # what the catalog and the UI show
    if algo == "boft":  # several butterfly stages, not a diagonal OFT in disguise
        assert min(d.blocks.dim() for d in adapter.deltas.values()) == 4
        assert max(d.blocks.shape[0] for d in adapter.deltas.values()) >= 3
    assert any(k.startswith("text_encoder.") for k in adapter.deltas) and any(
        k.startswith("unet.") for k in adapter.deltas
    )

    rt = LoraRuntime(sd15_pipe)
    rt.add(adapter)
    rt.set_weights({adapter.name: 1.0}, {adapter.name: 1.0})
    inputs = _unet_inputs(sd15_pipe)
    unfused = _unet(sd15_pipe, inputs)
    rt.fuse()
    worst, changed = _worst_layer(ref, sd15_pipe, base)
    assert changed > 20 and worst < TOL, (case, worst)
    fused = _unet(sd15_pipe, inputs)
    assert _rel(unfused, fused) < 1e-4, case
    assert _rel(fused, _unet(ref, inputs)) < 1e-4, case  # the image: LyCORIS's merged model
    rt.unfuse()
    for comp in ("unet", "text_encoder"):
        for (k, a), b in zip(getattr(sd15_pipe, comp).state_dict().items(), getattr(base, comp).state_dict().values()):
            assert torch.equal(a, b), (case, k)  # bit-exact
    rt.clear()
    assert torch.equal(_unet(sd15_pipe, inputs), _unet(base, inputs))


@pytest.mark.parametrize("algo,kw", [("loha", {}), ("lokr", {"factor": 2}), ("loha", {"use_tucker": True})])
def test_alpha_other_than_rank_matches_lycoris_forward(sd15_pipe, preset, tmp_path, algo, kw):
    """alpha / r scales the delta once, as LyCORIS's forward does (its 4.1.3 merge_to applies it twice)."""
    path, ref = lycoris_file(sd15_pipe, preset, algo, tmp_path / "a.safetensors", dim=4, alpha=2.0, merge=False, **kw)
    adapter = load_adapter(path)
    rt = LoraRuntime(sd15_pipe)
    rt.add(adapter)
    rt.set_weights({adapter.name: 1.0}, {adapter.name: 1.0})
    inputs = _unet_inputs(sd15_pipe)
    want = _unet(ref, inputs)
    assert _rel(_unet(sd15_pipe, inputs), want) < 1e-4
    rt.fuse()
    assert _rel(_unet(sd15_pipe, inputs), want) < 1e-4


@pytest.mark.parametrize("case", ["loha", "lokr-low-rank", "locon-tucker", "dora-locon", "glora", "diag-oft", "ia3"])
def test_sdxl_two_text_encoders(sdxl_pipe, preset, tmp_path, case):
    """LyCORIS writes lora_te1_/lora_te2_ for SDXL's two text encoders; fused equals its merge, for each family."""
    algo, kw, kind = CASES[case]
    kw = {"dim": 4, "alpha": 4.0, **kw}
    dim, alpha = kw.pop("dim"), kw.pop("alpha")
    base = copy.deepcopy(sdxl_pipe)
    ref = copy.deepcopy(sdxl_pipe)
    tes = [ref.text_encoder, ref.text_encoder_2]
    net = kohya.create_network(1.0, dim, alpha, ref.vae, tes, ref.unet, preset=preset, algo=algo, **kw)
    net.apply_to(tes, ref.unet, True, True)
    _randomise(net.named_parameters())
    path = tmp_path / f"xl-{case}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    for lora in net.loras:
        lora.merge_to(1.0)
        lora.restore()
    adapter = load_adapter(path)
    assert {type(d).__name__ for d in adapter.deltas.values()} == {kind}
    assert adapter.family == "sdxl" and {"unet", "text_encoder", "text_encoder_2"} <= adapter.components()
    rt = LoraRuntime(sdxl_pipe)
    rt.add(adapter)
    rt.set_weights({adapter.name: 1.0}, {adapter.name: 1.0})
    rt.fuse()
    worst = 0.0
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        a = dict(getattr(ref, comp).named_parameters())
        for k, v in getattr(sdxl_pipe, comp).named_parameters():
            worst = max(worst, float((a[k] - v).detach().norm() / a[k].detach().norm().clamp_min(1e-12)))
    assert worst < TOL
    rt.unfuse()
    assert all(
        torch.equal(a, b) for a, b in zip(sdxl_pipe.text_encoder_2.parameters(), base.text_encoder_2.parameters())
    )


def test_weight_signal_reads_the_kinds_exactly(tmp_path):
    """The retriever's weight signal reads a LoHa/LoKr through its exact factors: the same as the plain LoRA
    that save_adapter writes for it."""
    from lora_composer.adapters import save_adapter
    from lora_composer.retriever.signals.weights import encode_adapter

    files = _hand_files(tmp_path)
    for name in ("loha", "lokr"):
        adapter = load_adapter(files[name][0])
        plain = load_adapter(save_adapter(adapter, tmp_path / f"{name}-as-lora.safetensors"))
        assert all(isinstance(d, LayerDelta) for d in plain.deltas.values())
        got, want = encode_adapter(adapter), encode_adapter(plain)
        assert got is not None and np.allclose(np.abs(got[0]), np.abs(want[0]), atol=1e-5), name


def test_weight_signal_leaves_out_kinds_without_factors(tmp_path):
    """IA3 scales the base weight, so the weight signal has nothing to read in it: the file gets no weight
    directions (it is still indexed by its name and metadata), not an error that keeps it out of the catalog."""
    from lora_composer.retriever.signals.weights import encode_adapter, kv_deltas

    ia3 = tmp_path / "ia3.safetensors"
    save_file({f"{_k(TO_K)}.weight": 0.5 * torch.ones(32), f"{_k(TO_K)}.on_input": torch.tensor(0)}, str(ia3))
    adapter = load_adapter(ia3)
    assert [k for k in adapter.deltas if k.endswith("attn2.to_k")]  # a key/value layer, of a kind without factors
    assert list(kv_deltas(adapter)) == [] and encode_adapter(adapter) is None


def test_both_text_encoder_spellings_load_the_same(sd15_pipe, preset, tmp_path):
    path, _ = lycoris_file(sd15_pipe, preset, "loha", tmp_path / "te.safetensors", merge=False)
    sd = load_file(str(path))
    assert any(k.startswith("lora_te_encoder_") for k in sd)
    civitai = {k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v for k, v in sd.items()}
    save_file(civitai, str(tmp_path / "civitai.safetensors"))
    a, b = load_adapter(path), load_adapter(tmp_path / "civitai.safetensors")
    assert a.deltas.keys() == b.deltas.keys()
    assert all(torch.equal(a.deltas[k].up, b.deltas[k].up) for k in a.deltas)


# ----------------------------------------------------------------------------------------------- PEFT files


def _peft_configs():
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    targets = ["to_k", "to_v", "conv1", "ff.net.2"]
    return {
        "loha": (LoHaConfig(r=4, alpha=2, target_modules=targets), {"r": 4, "alpha": 2}),
        "loha-tucker": (
            LoHaConfig(r=2, alpha=3, target_modules=targets, use_effective_conv2d=True),
            {"r": 2, "alpha": 3},
        ),
        "lokr": (LoKrConfig(r=4, alpha=2, target_modules=targets), {"r": 4, "alpha": 2}),
        "lokr-low-rank": (
            LoKrConfig(r=2, alpha=3, target_modules=targets, decompose_factor=8, use_effective_conv2d=True),
            {"r": 2, "alpha": 3},
        ),
        "dora": (
            LoraConfig(r=4, lora_alpha=2, target_modules=targets, use_dora=True),
            {"r": 4, "lora_alpha": 2, "use_dora": True},
        ),
        "ia3": (
            IA3Config(target_modules=targets, feedforward_modules=["ff.net.2"]),
            {"feedforward_modules": ["ff.net.2"]},
        ),
    }


@pytest.mark.parametrize("case", ["loha", "loha-tucker", "lokr", "lokr-low-rank", "dora", "ia3"])
def test_peft_files_match_peft_forward(sd15_pipe, tmp_path, case):
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    config, meta = _peft_configs()[case]
    ref = copy.deepcopy(sd15_pipe)
    inject_adapter_in_model(config, ref.unet)
    _randomise(
        [(n, p) for n, p in ref.unet.named_parameters() if any(s in n for s in ("hada_", "lokr_", "ia3_l", "lora_"))]
    )
    tensors = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(ref.unet).items()}
    header = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in meta.items()})}
    path = tmp_path / f"peft-{case}.safetensors"
    save_file(tensors, str(path), metadata=header)

    adapter = load_adapter(path)
    assert adapter.metadata.source_format == "diffusers"
    rt = LoraRuntime(sd15_pipe)
    rt.add(adapter)
    rt.set_weights({adapter.name: 1.0})
    inputs = _unet_inputs(sd15_pipe)
    want = _unet(ref, inputs)
    assert _rel(_unet(sd15_pipe, inputs), want) < TOL, case
    rt.fuse()
    assert _rel(_unet(sd15_pipe, inputs), want) < TOL, case


# ----------------------------------------------------------------------------------------------- the formula

TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.0.resnets.0.conv1"


def _k(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _hand_files(tmp_path):
    """Four kohya files on two layers (a Linear 32->32 and a 3x3 Conv 32->32), written from raw tensors."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    files = {}
    loha = {}
    for path, cols in ((TO_K, 32), (CONV, 32 * 9)):
        for n in ("1", "2"):
            loha[f"{_k(path)}.hada_w{n}_a"], loha[f"{_k(path)}.hada_w{n}_b"] = r(32, 2), r(2, cols)
        loha[f"{_k(path)}.alpha"] = torch.tensor(1.0)
    lokr = {
        f"{_k(TO_K)}.lokr_w1": r(4, 4),
        f"{_k(TO_K)}.lokr_w2_a": r(8, 2),
        f"{_k(TO_K)}.lokr_w2_b": r(2, 8),
        f"{_k(TO_K)}.alpha": torch.tensor(1.0),
        f"{_k(CONV)}.lokr_w1": r(4, 4),
        f"{_k(CONV)}.lokr_w2": r(8, 8, 3, 3),
        f"{_k(CONV)}.alpha": torch.tensor(3.0),
    }
    dora = {
        f"{_k(TO_K)}.lora_down.weight": r(2, 32),
        f"{_k(TO_K)}.lora_up.weight": r(32, 2),
        f"{_k(TO_K)}.alpha": torch.tensor(1.0),
        f"{_k(TO_K)}.dora_scale": 1 + r(32, 1).abs(),
        f"{_k(CONV)}.lora_down.weight": r(2, 32, 3, 3),
        f"{_k(CONV)}.lora_up.weight": r(32, 2, 1, 1),
        f"{_k(CONV)}.alpha": torch.tensor(2.0),
        f"{_k(CONV)}.dora_scale": 1 + r(32, 1, 1, 1).abs(),
    }
    lora = {
        f"{_k(TO_K)}.lora_down.weight": r(3, 32),
        f"{_k(TO_K)}.lora_up.weight": r(32, 3),
        f"{_k(TO_K)}.alpha": torch.tensor(1.5),
        f"{_k(CONV)}.lora_down.weight": r(3, 32, 3, 3),
        f"{_k(CONV)}.lora_up.weight": r(32, 3, 1, 1),
    }
    for name, sd in (("loha", loha), ("lokr", lokr), ("dora", dora), ("lora", lora)):
        files[name] = (tmp_path / f"{name}.safetensors", sd)
        save_file(sd, str(files[name][0]))
    return files


WEIGHTS = {"loha": 0.7, "lokr": -0.4, "dora": 0.6, "lora": 1.3}


def _formula(path: str, w0: torch.Tensor, files) -> torch.Tensor:
    """The documented meaning, written from the raw tensors: W = W0 + sum_i w_i d_i with
    LoHa d = (alpha/r) (A1 B1 * A2 B2); LoKr d = (alpha/r) kron(W1, W2a W2b) (scale 1 when both sides are full);
    DoRA d = m (W0 + s B A) / (||W0 + s B A||_row + eps) - W0; LoRA d = (alpha/r) B A."""
    k, shape = _k(path), w0.shape
    w0 = w0.double()
    flat = w0.reshape(shape[0], -1)
    h = {n: v.double() for n, v in files["loha"][1].items() if n.startswith(k + ".")}
    d_loha = (
        (h[f"{k}.alpha"] / 2)
        * (h[f"{k}.hada_w1_a"] @ h[f"{k}.hada_w1_b"])
        * (h[f"{k}.hada_w2_a"] @ h[f"{k}.hada_w2_b"])
    )
    kr = {n: v.double() for n, v in files["lokr"][1].items() if n.startswith(k + ".")}
    if f"{k}.lokr_w2" in kr:
        w2 = kr[f"{k}.lokr_w2"]
        d_lokr = torch.kron(kr[f"{k}.lokr_w1"][:, :, None, None], w2)  # both full: scale 1
    else:
        d_lokr = (kr[f"{k}.alpha"] / 2) * torch.kron(kr[f"{k}.lokr_w1"], kr[f"{k}.lokr_w2_a"] @ kr[f"{k}.lokr_w2_b"])
    dr = {n: v.double() for n, v in files["dora"][1].items() if n.startswith(k + ".")}
    v = flat + (dr[f"{k}.alpha"] / 2) * dr[f"{k}.lora_up.weight"].reshape(shape[0], 2) @ dr[
        f"{k}.lora_down.weight"
    ].reshape(2, -1)
    eps = torch.finfo(torch.float32).eps
    d_dora = dr[f"{k}.dora_scale"].reshape(-1, 1) * v / (v.norm(dim=1, keepdim=True) + eps) - flat
    lo = {n: v.double() for n, v in files["lora"][1].items() if n.startswith(k + ".")}
    alpha = lo.get(f"{k}.alpha", torch.tensor(3.0))
    d_lora = (alpha / 3) * lo[f"{k}.lora_up.weight"].reshape(shape[0], 3) @ lo[f"{k}.lora_down.weight"].reshape(3, -1)
    total = flat.clone()
    for name, d in (("loha", d_loha), ("lokr", d_lokr), ("dora", d_dora), ("lora", d_lora)):
        total += WEIGHTS[name] * d.reshape(shape[0], -1)
    return total.reshape(shape).float()


def test_merge_of_loha_lokr_dora_lora_is_the_documented_formula(sd15_pipe, tmp_path):
    files = _hand_files(tmp_path)
    base = {p: sd15_pipe.unet.get_submodule(p).weight.detach().clone() for p in (TO_K, CONV)}
    rt = LoraRuntime(sd15_pipe)
    for name, (path, _) in files.items():
        rt.add(load_adapter(path, name=name))
    rt.set_weights(WEIGHTS)
    g = torch.Generator().manual_seed(3)
    x_lin, x_conv = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, 8, 8, generator=g)
    for path in (TO_K, CONV):
        module = sd15_pipe.unet.get_submodule(path)
        want_w = _formula(path, base[path], files)
        if path == TO_K:
            want = F.linear(x_lin, want_w, module.bias)
            got = module(x_lin)
        else:
            want = module._conv_forward(x_conv, want_w, module.bias)
            got = module(x_conv)
        assert _rel(got.detach(), want) < TOL, path  # unfused
    rt.fuse()
    for path in (TO_K, CONV):
        w = sd15_pipe.unet.get_submodule(path).weight.detach()
        want_w = _formula(path, base[path], files)
        assert float((w - want_w).norm() / want_w.norm()) < TOL, path  # fused
    rt.unfuse()
    assert all(torch.equal(sd15_pipe.unet.get_submodule(p).weight, base[p]) for p in base)


def test_per_row_weights_route_every_kind(sd15_pipe, tmp_path):
    """Row i of the batch gets only adapter i (Composite's routing): each row equals that adapter alone."""
    files = _hand_files(tmp_path)
    rt = LoraRuntime(sd15_pipe)
    names = list(files)
    for name in names:
        rt.add(load_adapter(files[name][0], name=name))
    inputs = _unet_inputs(sd15_pipe, batch=len(names))
    rt.set_denoiser_rows(torch.eye(len(names)))
    rows = _unet(sd15_pipe, inputs)
    for i, name in enumerate(names):
        rt.set_weights({name: 1.0})
        alone = _unet(sd15_pipe, inputs)
        assert _rel(rows[i], alone[i]) < 1e-5, name


@pytest.mark.parametrize("strategy", ["switch", "composite", "gated", "activation-matched", "ties", "klora", "tsv"])
def test_strategies_run_with_lycoris_kinds(sd15_pipe, tmp_path, strategy):
    files = _hand_files(tmp_path)
    ia3 = tmp_path / "ia3.safetensors"
    save_file({f"{_k(TO_K)}.weight": 0.5 * torch.ones(32), f"{_k(TO_K)}.on_input": torch.tensor(0)}, str(ia3))
    loras = [(path, 0.7) for path, _ in files.values()] + [(ia3, 0.8)]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    base = composer("a red circle", seed=0, **CALL)
    got = composer("a red circle", loras=loras, strategy=strategy, seed=0, **CALL)
    assert np.isfinite(got).all() and np.abs(got - base).max() > 1e-3
    assert composer.last_record.strategy == strategy
    assert len(composer.last_driver.history) == CALL["num_inference_steps"]


# ----------------------------------------------------------------------------------------------- malformed


def _malformed(tmp_path):
    files = _hand_files(tmp_path)
    k = _k(TO_K)
    bad = {}
    loha = dict(files["loha"][1])
    del loha[f"{k}.hada_w2_b"]
    bad["missing-factor"] = (loha, f"{k}.hada_w2_b")
    lokr = dict(files["lokr"][1])
    lokr[f"{k}.lokr_w2_b"] = torch.zeros(3, 8)
    bad["rank-mismatch"] = (lokr, f"{k}.lokr_w2_b")
    lokr2 = dict(files["lokr"][1])
    lokr2[f"{k}.lokr_w1"] = torch.zeros(4, 5)  # kron is 32x40: does not fit the 32x32 layer
    bad["wrong-shape"] = (lokr2, "to_k")
    dora = dict(files["dora"][1])
    dora[f"{k}.dora_scale"] = dora[f"{k}.dora_scale"].clone()
    dora[f"{k}.dora_scale"][3, 0] = float("nan")
    bad["nan"] = (dora, "attn2.to_k")
    dora2 = dict(files["dora"][1])
    dora2[f"{k}.dora_scale"] = torch.ones(16, 1)
    bad["magnitude-size"] = (dora2, "to_k")
    full = {f"{k}.diff": torch.zeros(32, 32), f"{k}.diff_b": torch.zeros(31)}
    bad["bias-size"] = (full, f"{k}.diff_b")
    ia3 = {f"{k}.weight": torch.zeros(31), f"{k}.on_input": torch.tensor(0)}
    bad["ia3-size"] = (ia3, "to_k")
    paths = {}
    for name, (sd, key) in bad.items():
        paths[name] = (tmp_path / f"bad-{name}.safetensors", key)
        save_file(sd, str(paths[name][0]))
    return files, paths


def test_malformed_files_are_refused_in_one_line_and_leave_the_pipeline(sd15_pipe, tmp_path):
    files, bad = _malformed(tmp_path)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    good = files["loha"][0]
    before = composer("a cat", loras=[(good, 0.8)], seed=0, **CALL)
    state = {k: v.clone() for k, v in composer.pipe.unet.state_dict().items()}
    hooks = sum(len(m._forward_hooks) for m in composer.pipe.unet.modules())
    for name, (path, key) in bad.items():
        with pytest.raises(ComposerError) as err:
            composer("a cat", loras=[(good, 0.8), (path, 0.5)], seed=0, **CALL)
        message = str(err.value)
        assert "\n" not in message and path.name in message and key in message, (name, message)
        assert set(composer.adapters) == {"loha"}, name
        assert sum(len(m._forward_hooks) for m in composer.pipe.unet.modules()) == hooks, name
        assert all(torch.equal(composer.pipe.unet.state_dict()[k], v) for k, v in state.items()), name
    assert np.array_equal(composer("a cat", loras=[(good, 0.8)], seed=0, **CALL), before)


# ----------------------------------------------------------------------------------------------- convert


def _fused_weights(pipe, path, weight=0.8):
    rt = LoraRuntime(pipe)
    adapter = load_adapter(path)
    rt.add(adapter)
    rt.set_weights({adapter.name: weight})
    rt.fuse()
    out = {p: pipe.unet.get_submodule(p).weight.detach().clone() for p in (TO_K, CONV)}
    rt.clear()
    return out


def test_convert_rank_refactors_loha_lokr_full_by_svd(sd15_pipe, tmp_path, capsys):
    from lora_composer.frontends.cli import main

    files = _hand_files(tmp_path)
    full = tmp_path / "full.safetensors"
    g = torch.Generator().manual_seed(5)
    save_file(
        {
            f"{_k(TO_K)}.diff": 0.1 * torch.randn(32, 32, generator=g),
            f"{_k(CONV)}.diff": 0.1 * torch.randn(32, 32, 3, 3, generator=g),
        },
        str(full),
    )
    for src in (files["loha"][0], files["lokr"][0], full):
        exact, low = tmp_path / f"{src.stem}-r32.safetensors", tmp_path / f"{src.stem}-r1.safetensors"
        assert main(["convert", "--rank", "32", str(src), str(exact), "-q"]) == 0
        assert main(["convert", "--rank", "1", str(src), str(low), "-q"]) == 0
        want = _fused_weights(sd15_pipe, src)
        got = _fused_weights(sd15_pipe, exact)
        for p in want:
            assert float((got[p] - want[p]).norm() / want[p].norm()) < TOL, (src.stem, p)
        assert load_adapter(low).ranks == {1}
    shira = tmp_path / "lokr-shira.safetensors"
    assert main(["convert", "--to", "shira", "--density", "0.5", str(files["lokr"][0]), str(shira), "-q"]) == 0
    kept = load_adapter(shira).deltas  # its 3x3 conv layer is kept, shaped like the kernel, as a LoCon's is
    assert set(kept) == {f"unet.{TO_K}", f"unet.{CONV}"} and kept[f"unet.{CONV}"].shape == (32, 32, 3, 3)
    capsys.readouterr()
    assert main(["convert", "--rank", "1", str(files["dora"][0]), str(tmp_path / "x.safetensors"), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "attn2.to_k: a dora delta depends on the base weight" in err


def test_glora_with_a_tucker_core_matches_lycoris_formula(sd15_pipe, preset, tmp_path):
    """GLoRA files from LyCORIS versions that wrote a Tucker core (``bm.weight`` between ``b1`` and a 1x1 ``b2``)
    fold to ``W0 + (W0 a1 a2 + tucker(b1, b2, bm)) alpha / r``: LyCORIS's own ``_glora_weight`` is the reference."""
    from lycoris.modules.glora import _glora_weight

    path, _ = lycoris_file(sd15_pipe, preset, "glora", tmp_path / "glora.safetensors", merge=False)
    sd = load_file(str(path))
    convs = sorted(
        k[: -len(".b2.weight")] for k, v in sd.items() if k.endswith(".b2.weight") and v.dim() == 4 and v.shape[-1] == 3
    )
    assert convs
    gen = torch.Generator().manual_seed(5)
    for key in convs:
        r, n_in = sd[f"{key}.b2.weight"].shape[:2]
        sd[f"{key}.b2.weight"] = torch.randn(r, n_in, 1, 1, generator=gen) * 0.1
        sd[f"{key}.bm.weight"] = torch.randn(r, r, 3, 3, generator=gen) * 0.1
    tucker = tmp_path / "glora-tucker.safetensors"
    save_file(sd, str(tucker))
    adapter = load_adapter(tucker)
    base = {k: v.detach().clone() for k, v in sd15_pipe.unet.named_parameters()}
    rt = LoraRuntime(sd15_pipe)
    rt.add(adapter)
    rt.set_weights({adapter.name: 1.0}, {adapter.name: 1.0})
    inputs = _unet_inputs(sd15_pipe)
    unfused = _unet(sd15_pipe, inputs)
    rt.fuse()
    assert _rel(unfused, _unet(sd15_pipe, inputs)) < 1e-4
    checked = 0
    for key in convs:
        module = key.removeprefix("lora_unet_")
        name = next(n for n in base if n.endswith(".weight") and n[: -len(".weight")].replace(".", "_") == module)
        t = {s: sd[f"{key}.{s}.weight"] for s in ("a1", "a2", "b1", "b2", "bm")}
        alpha = float(sd[f"{key}.alpha"]) if f"{key}.alpha" in sd else float(t["a2"].shape[0])
        want = base[name] + _glora_weight(
            base[name], t["a1"], t["a2"], t["b1"], t["b2"], t["bm"], alpha / t["a2"].shape[0]
        )
        got = dict(sd15_pipe.unet.named_parameters())[name].detach()
        assert _rel(got, want) < TOL, (key, _rel(got, want))
        checked += 1
    assert checked == len(convs)
    rt.unfuse()
    assert all(torch.equal(v, base[k]) for k, v in sd15_pipe.unet.named_parameters())
