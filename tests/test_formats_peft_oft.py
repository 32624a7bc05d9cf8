"""PEFT's OFT and BOFT (``OFTConfig``/``BOFTConfig``), written by PEFT itself with ``save_pretrained`` for the tiny
SD1.5 pipeline: fused weights must equal PEFT's merge, outputs PEFT's own forward, unfused the fused.

PEFT's OFT on a Conv2d with a kernel wider than 1 runs unmerged through ``unfold``/``fold``, which sums the
overlapping patches: its forward is not its merge there. Its merge (the weight it saves into the model) is
the reference for those layers.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_composer.adapters import load_adapter
from lora_composer.adapters.kinds import OFTDelta, kind_label
from lora_composer.errors import AdapterLoadError, ComposerError
from lora_composer.pipeline import ComposerPipeline
from lora_composer.runtime import LoraRuntime

peft = pytest.importorskip("peft")

TOL = 1e-5
IMAGE = dict(num_inference_steps=2, height=64, width=64, output_type="np")
LINEAR = ["to_k", "to_v", "ff.net.2", "proj_in"]  # Linear 32->32, 128->32 and a 1x1 Conv2d
CONV = "down_blocks.0.resnets.0.conv1"  # a 3x3 Conv2d, 32 * 9 inputs


class _BlockDiag:
    """PEFT builds BOFT with more than one butterfly factor only through its CUDA extension (on CPU it falls
    back to one factor); this is that extension's block diagonal, in torch."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*x[n]) for n in range(x.shape[0])])]


@pytest.fixture
def fbd(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiag())


def _config(case: str):
    from peft import BOFTConfig, OFTConfig

    return {
        "oft": OFTConfig(oft_block_size=8, r=0, target_modules=LINEAR),  # PEFT's default: Cayley-Neumann, 5 terms
        "oft-exact-r": OFTConfig(r=4, oft_block_size=0, target_modules=LINEAR, use_cayley_neumann=False),
        "oft-neumann-3": OFTConfig(oft_block_size=4, r=0, target_modules=LINEAR, num_cayley_neumann_terms=3),
        "oft-coft": OFTConfig(oft_block_size=8, r=0, target_modules=LINEAR, coft=True, eps=0.1),
        "oft-block-share": OFTConfig(oft_block_size=8, r=0, target_modules=LINEAR, block_share=True),
        "oft-conv": OFTConfig(oft_block_size=8, r=0, target_modules=LINEAR + ["conv1"]),
        "boft": BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules=LINEAR + ["conv1"]),
        "boft-one-factor": BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=LINEAR),
    }[case]


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name or "boft_R" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "boft_s" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def peft_folder(model, config, path):
    """Wrap ``model`` (a copy) with PEFT, randomise, ``save_pretrained`` to ``path``; return the PeftModel."""
    from peft import get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), config)
    _randomise(wrapped)
    wrapped.save_pretrained(str(path))  # before any forward: COFT projects the weights in place when run
    return wrapped


def pipeline_file(wrapped, folder, path):
    """The same adapter as one pipeline file: ``unet.<module>`` keys, the config in ``lora_adapter_metadata``."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(wrapped)
    tensors = {f"unet.{k.removeprefix('base_model.model.')}": v.contiguous() for k, v in sd.items()}
    meta = {f"unet.{k}": v for k, v in json.loads((folder / "adapter_config.json").read_text()).items()}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path


def _unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    latents = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    return latents, torch.tensor([500, 500]), torch.randn(2, 6, cfg.cross_attention_dim, generator=g)


@torch.no_grad()
def _run(unet, inputs):
    return unet(*inputs).sample


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _worst(merged: torch.nn.Module, ours: torch.nn.Module, base: torch.nn.Module) -> tuple[float, int]:
    """Largest per-weight relative error (Frobenius) against PEFT's merge, and how many weights it changed."""
    want = dict(merged.named_parameters())
    old = dict(base.named_parameters())
    worst, changed = 0.0, 0
    for k, v in ours.named_parameters():
        if k in want:
            changed += int(not torch.equal(want[k], old[k]))
            worst = max(worst, float((want[k] - v).detach().norm() / want[k].detach().norm()))
    return worst, changed


CASES = ["oft", "oft-exact-r", "oft-neumann-3", "oft-coft", "oft-block-share", "oft-conv", "boft", "boft-one-factor"]


@pytest.mark.parametrize("case", CASES)
def test_peft_folder_matches_peft_merge_and_forward(sd15_pipe, tmp_path, fbd, case):
    config = _config(case)
    base = copy.deepcopy(sd15_pipe.unet)
    wrapped = peft_folder(base, config, tmp_path / case)
    inputs = _unet_inputs(sd15_pipe)
    if case == "boft":  # several butterfly factors, not PEFT's one-factor CPU fallback
        assert max(m.boft_R["default"].shape[0] for m in wrapped.modules() if hasattr(m, "boft_R")) == 3
    forward = _run(wrapped, inputs)  # PEFT's own unmerged forward
    merged = wrapped.merge_and_unload()

    adapter = load_adapter(tmp_path / case)
    assert adapter.name == case and adapter.components() == {"unet"}
    assert load_adapter(tmp_path / case / "adapter_model.safetensors").name == case  # the folder's file reads the same
    assert {type(d) for d in adapter.deltas.values()} == {OFTDelta}
    assert kind_label(adapter) == ("BOFT" if case == "boft" else "OFT")  # one factor is a diagonal OFT
    rt = LoraRuntime(sd15_pipe)
    rt.add(adapter)
    rt.set_weights({adapter.name: 1.0})
    unfused = _run(sd15_pipe.unet, inputs)
    rt.fuse()
    worst, changed = _worst(merged, sd15_pipe.unet, base)
    assert changed >= 16 and worst < TOL, (case, worst)
    fused = _run(sd15_pipe.unet, inputs)
    assert _rel(unfused, fused) < TOL, case
    assert _rel(fused, _run(merged, inputs)) < 1e-4, case
    if case != "oft-conv":  # PEFT's unmerged 3x3 conv is not its merge (module docstring)
        assert _rel(fused, forward) < 1e-4, case
    rt.unfuse()
    assert all(torch.equal(a, b) for a, b in zip(sd15_pipe.unet.state_dict().values(), base.state_dict().values()))


def test_weight_scales_the_rotation_as_documented_and_files_read_like_folders(sd15_pipe, tmp_path):
    """Weight w gives W0 + w (f(W0) - W0), fused and unfused; the same tensors as ``<component>.<module>`` keys
    with the config in ``lora_adapter_metadata`` (how PEFT kinds inside a pipeline file are read) load the same."""
    config = _config("oft-coft")
    base = copy.deepcopy(sd15_pipe.unet)
    wrapped = peft_folder(base, config, tmp_path / "folder")
    pipeline_file(wrapped, tmp_path / "folder", tmp_path / "file.safetensors")
    merged = wrapped.merge_and_unload()

    folder, file = load_adapter(tmp_path / "folder"), load_adapter(tmp_path / "file.safetensors")
    assert folder.deltas.keys() == file.deltas.keys()
    for key, d in folder.deltas.items():
        w0 = sd15_pipe.unet.get_submodule(key.split(".", 1)[1]).weight.detach()
        assert torch.equal(d.dense(w0)[0], file.deltas[key].dense(w0)[0]), key

    w = 0.6
    rt = LoraRuntime(sd15_pipe)
    rt.add(file)
    rt.set_weights({file.name: w})
    inputs = _unet_inputs(sd15_pipe)
    unfused = _run(sd15_pipe.unet, inputs)
    rt.fuse()
    want = {k: v.detach() for k, v in merged.named_parameters()}
    old = dict(base.named_parameters())
    for k, v in sd15_pipe.unet.named_parameters():
        formula = old[k].detach() + w * (want[k] - old[k].detach())
        assert float((v.detach() - formula).norm()) <= TOL * float(formula.norm()), k
    assert _rel(unfused, _run(sd15_pipe.unet, inputs)) < TOL


def test_text_encoder_and_unet_image_match_peft(sd15_pipe, tmp_path):
    """OFT on the text encoder (its 37-wide MLP gets blocks of 1) and the UNet: the image equals the one the
    pipeline gives with PEFT's modules in place, fused and unfused."""
    from peft import OFTConfig

    ref = copy.deepcopy(sd15_pipe)
    te = peft_folder(
        ref.text_encoder, OFTConfig(oft_block_size=8, r=0, target_modules=["k_proj", "v_proj", "fc2"]), tmp_path / "te"
    )
    unet = peft_folder(ref.unet, _config("oft"), tmp_path / "unet")
    ref.text_encoder, ref.unet = te.base_model.model, unet.base_model.model
    want = ref("a red circle", generator=torch.Generator().manual_seed(0), **IMAGE).images

    adapters = [load_adapter(tmp_path / "te"), load_adapter(tmp_path / "unet")]
    assert [a.components() for a in adapters] == [{"text_encoder"}, {"unet"}]
    rt = LoraRuntime(sd15_pipe)
    for a in adapters:
        rt.add(a)
    rt.set_weights({"te": 1.0, "unet": 1.0}, {"te": 1.0, "unet": 1.0})
    unfused = sd15_pipe("a red circle", generator=torch.Generator().manual_seed(0), **IMAGE).images
    rt.fuse()
    fused = sd15_pipe("a red circle", generator=torch.Generator().manual_seed(0), **IMAGE).images
    rt.unfuse()
    rt.clear()
    plain = sd15_pipe("a red circle", generator=torch.Generator().manual_seed(0), **IMAGE).images
    assert np.abs(want - plain).max() > 1e-3  # the adapters change the image
    assert np.abs(unfused - want).max() < 1e-4 and np.abs(fused - want).max() < 1e-4
    assert np.abs(fused - unfused).max() < TOL


SERIES = [("0.17.1", (1, 2, 2, 2)), ("0.18.0", (1, 2, 2, 1)), (None, (1, 2, 2, 1))]  # 4 terms, by PEFT version


@pytest.mark.parametrize("version,coefficients", SERIES)
def test_cayley_neumann_series_follows_the_peft_version_that_wrote_it(sd15_pipe, tmp_path, version, coefficients):
    """PEFT 0.18 changed its 4-term series from I + 2Q + 2Q^2 + 2Q^3 to I + 2Q + 2Q^2 + Q^3 (it warns when it
    loads an older adapter); a config without a version gets the current one, as PEFT computes it."""
    g = torch.Generator().manual_seed(4)
    vec = 0.2 * torch.randn(4, 28, generator=g)
    config = {"unet.oft_block_size": 8, "unet.r": 0, "unet.num_cayley_neumann_terms": 4}
    if version:
        config["unet.peft_version"] = version
    path = tmp_path / "old.safetensors"
    save_file({f"unet.{TO_K}.oft_R.weight": vec}, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    delta = load_adapter(path).deltas[f"unet.{TO_K}"]
    m = torch.zeros(4, 8, 8, dtype=torch.float64)
    rows, cols = torch.triu_indices(8, 8, 1)
    m[:, rows, cols] = vec.double()
    q = m - m.transpose(-1, -2)
    r = sum(c * torch.linalg.matrix_power(q, j) for j, c in enumerate(coefficients))
    w0 = sd15_pipe.unet.get_submodule(TO_K).weight.detach()
    want = w0.double() @ torch.block_diag(*r).t()  # PEFT's merge: W R^T, R acting on the input
    got = w0 + delta.dense(w0)[0]
    assert float((got.double() - want).norm() / want.norm()) < TOL


# ----------------------------------------------------------------------------------------------- malformed

TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def _bad_files(tmp_path):
    """Files with PEFT's keys inside a pipeline file, each broken one way: (path, what the message names)."""
    g = torch.Generator().manual_seed(3)
    meta = {"lora_adapter_metadata": json.dumps({"unet.oft_block_size": 8, "unet.r": 0})}
    k = f"unet.{TO_K}"
    cases = {
        "missing-scale": ({f"{k}.boft_R": torch.randn(2, 8, 4, 4, generator=g)}, f"{TO_K}.boft_s"),
        "not-a-triangle": ({f"{k}.oft_R.weight": torch.randn(4, 27, generator=g)}, f"{TO_K}.oft_R.weight"),
        "blocks-do-not-fit": ({f"{k}.oft_R.weight": torch.randn(3, 28, generator=g)}, "to_k"),
        "nan": ({f"{k}.oft_R.weight": torch.full((4, 28), float("nan"))}, f"{TO_K}.oft_R.weight"),
        "boft-odd-blocks": (
            {f"{k}.boft_R": torch.randn(2, 11, 3, 3, generator=g), f"{k}.boft_s": torch.ones(32, 1)},
            f"{TO_K}.boft_R",
        ),
    }
    paths = {}
    for name, (sd, key) in cases.items():
        paths[name] = (tmp_path / f"bad-{name}.safetensors", key)
        save_file(sd, str(paths[name][0]), metadata=meta)
    return paths


def test_malformed_files_are_refused_in_one_line_and_leave_the_pipeline(sd15_pipe, tmp_path):
    from peft import OFTConfig

    peft_folder(sd15_pipe.unet, OFTConfig(oft_block_size=8, r=0, target_modules=["to_k"]), tmp_path / "good")
    good = tmp_path / "good" / "adapter_model.safetensors"  # named after its folder, as the library names it
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    call = dict(IMAGE, num_inference_steps=1, height=32, width=32, progress=False)
    before = composer("a cat", loras=[(good, 0.8)], seed=0, **call)
    state = {k: v.clone() for k, v in composer.pipe.unet.state_dict().items()}
    hooks = sum(len(m._forward_hooks) for m in composer.pipe.unet.modules())
    for name, (path, key) in _bad_files(tmp_path).items():
        with pytest.raises(ComposerError) as err:
            composer("a cat", loras=[(good, 0.8), (path, 0.5)], seed=0, **call)
        message = str(err.value)
        assert "\n" not in message and path.name in message and key in message, (name, message)
        assert set(composer.adapters) == {"good"}, name
        assert sum(len(m._forward_hooks) for m in composer.pipe.unet.modules()) == hooks, name
        assert all(torch.equal(composer.pipe.unet.state_dict()[k], v) for k, v in state.items()), name
    assert np.array_equal(composer("a cat", loras=[(good, 0.8)], seed=0, **call), before)

    (tmp_path / "good" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError) as err:
        load_adapter(tmp_path / "good")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'good'}: adapter_config.json is not readable JSON")


def test_peft_oft_from_before_0_14_is_still_refused_in_one_line(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({f"unet.{TO_K}.oft_r": torch.zeros(4, 8, 8), f"unet.{TO_K}.oft_s": torch.ones(32, 1)}, str(path))
    with pytest.raises(AdapterLoadError) as err:
        load_adapter(path)
    assert "\n" not in str(err.value) and "before PEFT 0.14" in str(err.value)
