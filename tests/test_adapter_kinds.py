"""A new delta kind is one class (its key names, parsing and math) plus one line in the kinds registry.

The toy kind here (``toy``: ``W' = W0 + alpha (W0 ⊙ u v^T)``, a rank-one elementwise rescaling of the base
weight) is registered in the test only, written to a file in kohya and in PEFT spelling, loaded, attached by
the runtime and checked against its formula by hand, fused and unfused; nothing outside the registry changes.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_composer.adapters import load_adapter
from lora_composer.adapters.kinds import KindDelta, KindError, registry
from lora_composer.adapters.kinds.base import need
from lora_composer.adapters.kinds.registry import kind_label
from lora_composer.errors import AdapterLoadError, ComposerError
from lora_composer.runtime import LoraRuntime

ROOT = Path(__file__).resolve().parents[1]
MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@dataclass(eq=False)
class ToyDelta(KindDelta):
    """``dense = alpha * W0 ⊙ (u v^T)``: depends on the base weight, so it is not additive."""

    u: torch.Tensor
    v: torch.Tensor
    alpha_: float = 1.0
    kind = "toy"
    label_ = "Toy"
    additive = False
    kohya_suffixes = ("toy_u", "toy_v")
    peft_suffixes = ("toy_u", "toy_v")

    def exact(self, shape=None):
        return None

    @property
    def in_width(self) -> int:
        return int(self.v.numel())

    def flat_delta(self):
        return torch.outer(self.u.float(), self.v.float())

    def dense(self, weight, bias=None):
        return self.alpha_ * weight.float() * torch.outer(self.u.float(), self.v.float()), None

    def check(self, shape):
        if (self.u.numel(), self.v.numel()) != (shape[0], shape[1]) or len(shape) != 2:
            return f"toy vectors are {self.u.numel()}x{self.v.numel()}, layer weight is {tuple(shape)}"
        return None

    @classmethod
    def from_kohya(cls, name, parts, alpha, inner=None):
        u, v = need(name, parts, "toy_u"), need(name, parts, "toy_v")
        if u.dim() != 1 or v.dim() != 1:
            raise KindError(f"key {name}.toy_u: expected vectors, got {tuple(u.shape)} and {tuple(v.shape)}")
        return cls(u, v, 1.0 if alpha is None else float(alpha))

    @classmethod
    def from_peft(cls, name, parts, layer, inner=None):
        return cls.from_kohya(name, parts, layer.alpha)


@pytest.fixture
def toy_registered(monkeypatch):
    """The one registry line a new kind needs (in the test only)."""
    monkeypatch.setattr(registry, "REGISTRY", [*registry.REGISTRY, ToyDelta])


def _vectors(pipe, seed=0):
    w = pipe.unet.get_submodule(MODULE).weight
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(w.shape[0], generator=gen), torch.randn(w.shape[1], generator=gen)


def _layer_out(pipe, x):
    with torch.no_grad():
        return pipe.unet.get_submodule(MODULE)(x)


@pytest.mark.parametrize("spelling", ["kohya", "peft"])
def test_a_registered_toy_kind_loads_attaches_and_follows_its_formula(sd15_pipe, tmp_path, toy_registered, spelling):
    pipe = sd15_pipe
    u, v = _vectors(pipe)
    alpha = 0.5
    if spelling == "kohya":
        sd = {f"{KOHYA}.toy_u": u, f"{KOHYA}.toy_v": v, f"{KOHYA}.alpha": torch.tensor(alpha)}
        path = tmp_path / "toy.safetensors"
        save_file(sd, str(path))
    else:  # a PEFT folder: alpha from its config
        folder = tmp_path / "toy"
        folder.mkdir()
        save_file(
            {f"base_model.model.{MODULE}.toy_u": u, f"base_model.model.{MODULE}.toy_v": v},
            str(folder / "adapter_model.safetensors"),
        )
        (folder / "adapter_config.json").write_text(
            '{"alpha": 0.5, "auto_mapping": {"base_model_class": "UNet2DConditionModel"}}'
        )
        path = folder
    adapter = load_adapter(path)
    ((key, delta),) = adapter.deltas.items()
    assert key == f"unet.{MODULE}" and delta.kind == "toy" and kind_label(adapter) == "Toy"

    module = pipe.unet.get_submodule(MODULE)
    w0, b0 = module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()
    x = torch.randn(2, 5, w0.shape[1], generator=torch.Generator().manual_seed(3))
    base = _layer_out(pipe, x)
    clean = copy.deepcopy(module)

    rt = LoraRuntime(pipe)
    rt.add(adapter)
    weight = 0.7
    rt.set_weights(unet={adapter.name: weight})
    by_hand = w0 + weight * alpha * w0 * torch.outer(u, v)  # the toy kind's formula, not its code
    want = torch.nn.functional.linear(x, by_hand, b0)
    torch.testing.assert_close(_layer_out(pipe, x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, base, atol=1e-3)  # the kind acts

    rt.fuse()
    torch.testing.assert_close(module.weight.detach(), by_hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_layer_out(pipe, x), want, atol=1e-5, rtol=1e-5)
    rt.unfuse()
    rt.clear()
    assert torch.equal(module.weight, clean.weight)
    assert torch.equal(_layer_out(pipe, x), base)


def test_without_its_registry_line_the_toy_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "toy.safetensors"
    save_file({f"{KOHYA}.toy_u": torch.ones(4), f"{KOHYA}.toy_v": torch.ones(4)}, str(path))
    with pytest.raises(AdapterLoadError) as info:
        load_adapter(path)
    msg = str(info.value)
    assert isinstance(info.value, ComposerError) and "\n" not in msg
    assert msg.startswith(f"{path}: ") and "unknown key format" in msg and "toy_u" in msg


def test_a_bad_toy_layer_names_its_key(tmp_path, toy_registered):
    path = tmp_path / "toy.safetensors"
    save_file({f"{KOHYA}.toy_u": torch.ones(4, 2), f"{KOHYA}.toy_v": torch.ones(4)}, str(path))
    with pytest.raises(AdapterLoadError, match=f"{KOHYA}.toy_u: expected vectors"):
        load_adapter(path)


def test_the_registry_lists_every_built_in_kind_once():
    names = [k.kind for k in registry.REGISTRY]
    assert sorted(names) == sorted(registry.KINDS) and len(set(names)) == len(names)


def _python_files():
    for folder in ("composer", "fusion", "retriever", "kernels", "bench"):
        yield from (ROOT / folder).rglob("*.py")


def test_no_kind_probes_outside_the_protocol():
    """Code reads ``is_sparse`` / ``additive`` as attributes every delta has, never with ``getattr`` defaults,
    and names no built-in kind outside the kinds package."""
    kinds_dir = ROOT / "composer" / "adapters" / "kinds"
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        assert 'getattr(d, "is_sparse"' not in text and 'getattr(d, "additive"' not in text, path
        if kinds_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "kind":
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not set(consts) & set(registry.KINDS), f"{path}:{node.lineno} branches on a kind"
