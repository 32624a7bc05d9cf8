"""tsv (Task Singular Vectors merge) against the paper's formula, written here in numpy.

End to end: the tiny SD1.5 pipeline with the adapters loaded through diffusers/PEFT; every LoRA layer's
delta is PEFT's ``get_delta_weight``; the numpy reference splits each into its singular vectors, replaces the
concatenated left and right vectors by their orthogonal polar factors and sums ``w_i U'_i S_i V'_i^T`` into a
copy of the base model without adapters; its picture must equal the strategy's.
"""

import numpy as np
import pytest
import torch

from lora_composer.adapters.types import Adapter, LayerDelta
from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext, get_strategy
from lora_composer.pipeline import ComposerPipeline
from tests.test_fusion_ties_dare import _peft_merged_model

PROMPT = "a red circle"
CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="np")


def _reference(deltas: list[np.ndarray], weights, side: str = "both") -> np.ndarray:
    """TSV-M from the paper: ``sum_i w_i U'_i S_i V'_i^T`` with ``U' = P Q^T`` for ``U = P S Q^T`` (same for V)."""
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
        keep = s > 1e-6 * s.max() if s.size and s.max() > 0 else np.zeros(s.shape, bool)
        us.append(u[:, keep]), ss.append(s[keep]), vs.append(vt[keep].T)

    def polar(m):
        p, _, qt = np.linalg.svd(m, full_matrices=False)
        return p @ qt

    u, v = np.concatenate(us, 1), np.concatenate(vs, 1)
    u = polar(u) if side in ("both", "out") else u
    v = polar(v) if side in ("both", "in") else v
    total, start = np.zeros(deltas[0].shape), 0
    for s, w in zip(ss, weights):
        cols = slice(start, start + s.size)
        total += w * (u[:, cols] * s) @ v[:, cols].T
        start += s.size
    return total


def _lora(g, out=12, inp=10, rank=3, scale=1.0, rows=slice(None), cols=slice(None)):
    """A random rank-``rank`` delta that writes only output ``rows`` and reads only input ``cols``."""
    up, down = torch.zeros(out, rank), torch.zeros(rank, inp)
    up[rows] = scale * torch.randn(up[rows].shape, generator=g)
    down[:, cols] = torch.randn(down[:, cols].shape, generator=g)
    return LayerDelta(down=down, up=up, alpha=float(rank))


def _dense(d: LayerDelta) -> torch.Tensor:
    return (d.up.reshape(d.up.shape[0], -1) * d.scale) @ d.down.reshape(d.down.shape[0], -1)


def _derive(adapters, weights, **args):
    strat = get_strategy("tsv", **args)
    strat.begin([a.name for a in adapters], weights, 4, StrategyContext(adapters=adapters))
    return strat.derived_adapters()


def test_loras_on_orthogonal_subspaces_are_left_as_they_are():
    """Disjoint output rows and input columns: the singular vectors are already orthogonal, TSV is merge."""
    g = torch.Generator().manual_seed(0)
    a = Adapter("a", "lora", {"x": _lora(g, rows=slice(0, 6), cols=slice(0, 5))})
    b = Adapter("b", "lora", {"x": _lora(g, rows=slice(6, 12), cols=slice(5, 10))})
    got = _derive([a, b], [1.0, 0.5])
    for ad in (a, b):
        assert torch.allclose(_dense(got[ad.name].deltas["x"]), _dense(ad.deltas["x"]), atol=1e-5)
    solo = _derive([a], [1.0])
    assert torch.allclose(_dense(solo["a"].deltas["x"]), _dense(a.deltas["x"]), atol=1e-5)


@pytest.mark.parametrize("side", ["both", "out", "in"])
def test_overlapping_loras_follow_the_formula(side):
    g = torch.Generator().manual_seed(1)
    ads = [Adapter(n, "lora", {"x": _lora(g, scale=1 + i)}) for i, n in enumerate("abc")]
    weights = [1.0, 0.6, 0.8]
    got = _derive(ads, weights, side=side)
    merged = sum(w * _dense(got[a.name].deltas["x"]) for a, w in zip(ads, weights))
    expected = _reference([_dense(a.deltas["x"]).numpy() for a in ads], weights, side)
    plain = sum(w * _dense(a.deltas["x"]) for a, w in zip(ads, weights))
    assert np.abs(merged.numpy() - expected).max() < 1e-5 * np.abs(expected).max()
    assert (merged - plain).abs().max() > 0.05 * plain.abs().max()  # overlap: not merge
    if side == "both":  # each LoRA keeps its singular values (its strength)
        for a in ads:
            s0 = torch.linalg.svdvals(_dense(a.deltas["x"]))[:3]
            s1 = torch.linalg.svdvals(_dense(got[a.name].deltas["x"]))[:3]
            assert torch.allclose(s0, s1, rtol=1e-4)


def test_bad_side_is_one_line():
    with pytest.raises(ComposerError, match="side must be one of both, out, in"):
        get_strategy("tsv", side="sideways")


def test_tsv_matches_the_reference(sd15_pipe, make_lora):
    files = {n: make_lora(sd15_pipe, n, rank=4, alpha=4 + i, seed=i + 1, conv=True) for i, n in enumerate("abc")}
    weights = [1.0, 0.6, 0.8]

    def tsv(deltas, w):  # PEFT's per-layer deltas, conv kernels flattened for the formula
        flat = [d.double().reshape(d.shape[0], -1).numpy() for d in deltas]
        return torch.from_numpy(_reference(flat, w.tolist())).reshape(deltas[0].shape)

    ref = _peft_merged_model(sd15_pipe, files, weights, tsv)
    expected = ref(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images

    pipe = ComposerPipeline(sd15_pipe)
    loras = [(str(p), w) for p, w in zip(files.values(), weights)]
    got = pipe(PROMPT, loras=loras, strategy="tsv", seed=0, progress=False, **CALL)
    plain = pipe(PROMPT, loras=loras, strategy="merge", seed=0, progress=False, **CALL)
    assert np.abs(np.asarray(got) - expected).max() < 1e-4
    assert np.abs(np.asarray(plain) - expected).max() > 1e-3  # the reference is not merge
    again = pipe(PROMPT, loras=loras, strategy="merge", seed=0, progress=False, **CALL)
    assert np.array_equal(np.asarray(again), np.asarray(plain))  # the derived adapters left nothing behind


def test_one_loha_with_a_flattened_conv_kernel_is_itself(sd15_pipe, tmp_path):
    """LoHa stores a conv layer's factors flattened (``[r, in * kh * kw]``): the derived factors must land on
    the 3x3 kernel as the original does, so tsv of one LoRA renders merge's picture."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    sd = {}
    for path, cols in (
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 32),
        ("down_blocks.0.resnets.0.conv1", 32 * 9),
    ):
        key = "lora_unet_" + path.replace(".", "_")
        for n in ("1", "2"):
            sd[f"{key}.hada_w{n}_a"] = 0.3 * torch.randn(32, 2, generator=g)
            sd[f"{key}.hada_w{n}_b"] = 0.3 * torch.randn(2, cols, generator=g)
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(tmp_path / "loha.safetensors"))
    pipe = ComposerPipeline(sd15_pipe)
    loras = [(str(tmp_path / "loha.safetensors"), 0.8)]
    merged = pipe(PROMPT, loras=loras, strategy="merge", seed=0, progress=False, **CALL)
    got = pipe(PROMPT, loras=loras, strategy="tsv", seed=0, progress=False, **CALL)
    base = pipe(PROMPT, seed=0, progress=False, **CALL)
    assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-3
    assert np.abs(np.asarray(got) - np.asarray(merged)).max() < 1e-4
