"""activation-matched fusion: the closed form, its reduction to merge, the derived adapters on a pipeline,
exact restoration and the Gram cache."""

import copy

import numpy as np
import pytest
import torch

from lora_composer.adapters import load_adapter
from lora_composer.fusion import activation_stats as stats
from lora_composer.fusion import get_strategy
from lora_composer.fusion.activation_matched import ActivationMatchedStrategy
from lora_composer.pipeline import ComposerPipeline

CALL = dict(num_inference_steps=2, height=64, width=64, output_type="np", progress=False)
FAST = dict(profile_steps=2, profile_images=1)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A cache folder of this test's own, and no Grams remembered from another test."""
    monkeypatch.setenv("LORA_COMPOSER_HOME", str(tmp_path / "home"))
    stats.clear_memory()
    yield
    stats.clear_memory()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_matches_a_direct_least_squares_solve(seed):
    """W0 + sum_i s_i B_i A_i' against lstsq on [X_1^T; ...; X_n^T; sqrt(lam) I] W^T = [Y_1^T; ...; sqrt(lam) W0^T]."""
    g = torch.Generator().manual_seed(seed)
    d, out, n = 12, 7, 3
    w0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    xs = [
        torch.randn(d, int(torch.randint(5, 30, (1,), generator=g)), generator=g, dtype=torch.float64) for _ in range(n)
    ]
    downs = [torch.randn(r, d, generator=g, dtype=torch.float64) for r in (2, 3, 4)]
    ups = [torch.randn(out, r, generator=g, dtype=torch.float64) for r in (2, 3, 4)]
    scales = [0.8, 1.3, 0.5]
    lam = 0.7

    grams = [x @ x.T for x in xs]
    new = stats.matched_downs(downs, grams, lam)
    fused = w0 + sum(s * b @ a for s, b, a in zip(scales, ups, new))

    lhs = torch.cat([x.T for x in xs] + [lam**0.5 * torch.eye(d, dtype=torch.float64)])
    rhs = torch.cat([((w0 + s * b @ a) @ x).T for s, b, a, x in zip(scales, ups, downs, xs)] + [lam**0.5 * w0.T])
    direct = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(fused, direct, rtol=1e-9, atol=1e-9)


def test_relative_lambda_follows_the_gram_scale():
    grams = [torch.eye(4) * 2, torch.eye(4) * 4]
    assert stats.relative_lambda(grams, 0.5) == pytest.approx(3.0)


def test_conv_down_factor_is_flattened_like_unfolded_patches():
    """A LoCon kernel's derived down factor acts on unfolded patches in the order ``down.reshape(r, -1)``."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 6, 6, generator=g)
    acc = stats._Accumulator(conv)
    conv(x)
    gram = acc.result()
    down = torch.randn(4, 3, 3, 3, generator=g)
    (new,) = stats.matched_downs([down], [gram], 0.3)
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(
        gram.double(), (patches.T.double() @ patches.double()) / patches.shape[0], rtol=1e-5, atol=1e-6
    )
    want = flat = (
        down.reshape(4, -1).double()
        @ gram.double()
        @ torch.linalg.inv(gram.double() + 0.3 * torch.eye(27, dtype=torch.float64))
    )
    assert new.shape == down.shape and flat.shape == (4, 27)
    torch.testing.assert_close(new.reshape(4, -1).double(), want, rtol=1e-4, atol=1e-5)
    # the conv with the derived kernel is the flattened product on patches
    y = torch.nn.functional.conv2d(x, new, padding=1)
    torch.testing.assert_close(
        y.flatten(2).transpose(1, 2).reshape(-1, 4), patches @ new.reshape(4, -1).T, rtol=1e-4, atol=1e-5
    )


def _strategy(**args) -> ActivationMatchedStrategy:
    return get_strategy("activation-matched", **{**FAST, **args})


def test_one_adapter_without_ridge_is_merge(sd15_pipe, make_lora, monkeypatch):
    """One adapter, lambda -> 0 on full-rank Grams: A G (G + lam I)^-1 = A, and the image is merge's.

    (The tiny model's own activations are rank-deficient: a LayerNorm without learned affine parameters puts
    its outputs on a hyperplane. Full-rank Grams are given here instead of collected.)"""
    path = make_lora(sd15_pipe, "a", rank=4, seed=1, conv=True)
    composer = ComposerPipeline(sd15_pipe)
    merged = composer("a red circle", loras=[(path, 0.9)], strategy="merge", seed=0, **CALL)

    def full_rank(pipe, runtime, adapter, *args, **kwargs):
        g = torch.Generator().manual_seed(0)
        out = {}
        for key, delta in adapter.deltas.items():
            d = delta.down[0].numel()
            x = torch.randn(d, 4 * d, generator=g)
            out[key] = x @ x.T / (4 * d)
        return out

    monkeypatch.setattr(stats, "grams_for", full_rank)
    strat = _strategy(alpha=1e-12)
    matched = composer("a red circle", loras=[(path, 0.9)], strategy=strat, seed=0, **CALL)
    derived = strat.derived_adapters()["a"]
    for key, delta in composer.adapters["a"].deltas.items():
        torch.testing.assert_close(derived.deltas[key].down, delta.down, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(matched, merged, atol=1e-4)


def test_derived_adapters_follow_the_formula_from_the_collected_grams(sd15_pipe, make_lora):
    files = [make_lora(sd15_pipe, n, rank=4, seed=i + 1, conv=True) for i, n in enumerate("abc")]
    composer = ComposerPipeline(sd15_pipe)
    weights = [0.8, 1.1, 0.6]
    strat = _strategy(alpha=0.05)
    composer("a red circle", loras=list(zip(files, weights)), strategy=strat, seed=0, **CALL)
    derived = strat.derived_adapters()
    assert set(derived) == {"a", "b", "c"} and all(derived[n].name == n + "~matched" for n in derived)
    grams = {}
    for n, w in zip("abc", weights):
        ad = load_adapter(files["abc".index(n)], name=n)
        key = stats.cache_key(
            ad,
            stats.model_fingerprint(composer.pipe),
            {**strat.settings(), "unet_weight": round(w, 6), "te_weight": round(w, 6)},
        )
        grams[n] = stats._MEMORY[key]
    seen = {"conv": 0, "linear": 0, "text": 0}
    for key in composer.adapters["a"].deltas:
        gs = [grams[n][key].double() for n in "abc"]
        g = sum(gs)
        lam = 0.05 * float(torch.diagonal(g).mean())
        deltas = [composer.adapters[n].deltas[key] for n in "abc"]
        flat = lambda t: t.reshape(t.shape[0], -1).double()  # noqa: E731
        # (sum_i s_i B_i A_i G_i)(G + lam I)^-1, written out
        num = sum(w * d.scale * flat(d.up) @ flat(d.down) @ gi for w, d, gi in zip(weights, deltas, gs))
        want = num @ torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=torch.float64))
        got = sum(
            w * derived[n].deltas[key].scale * flat(derived[n].deltas[key].up) @ flat(derived[n].deltas[key].down)
            for n, w in zip("abc", weights)
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        seen["text" if key.startswith("text_encoder") else "conv" if deltas[0].is_conv else "linear"] += 1
    assert all(seen.values()), seen


@pytest.mark.parametrize("fuse", [False, True])
def test_pipeline_is_restored_exactly(sd15_pipe, make_lora, fuse):
    files = [make_lora(sd15_pipe, n, rank=4, seed=i + 1, conv=True) for i, n in enumerate("ab")]
    composer = ComposerPipeline(sd15_pipe)
    merged = composer("a red circle", loras=[(files[0], 0.8), (files[1], 0.6)], strategy="merge", seed=0, **CALL)
    state = {k: v.clone() for k, v in composer.pipe.unet.state_dict().items()}
    state.update({"te." + k: v.clone() for k, v in composer.pipe.text_encoder.state_dict().items()})
    stacks = {k: (layer.down.clone(), layer.up.clone()) for k, layer in composer.runtime.layers.items()}
    mixes = (composer.runtime.denoiser_mix.weights.clone(), composer.runtime.text_mix.weights.clone())

    got = composer(
        "a red circle", loras=[(files[0], 0.8), (files[1], 0.6)], strategy=_strategy(), seed=0, fuse=fuse, **CALL
    )
    assert np.abs(got - merged).max() > 1e-4  # the derived adapters acted, not the originals
    assert list(composer.adapters) == ["a", "b"]
    after = {k: v for k, v in composer.pipe.unet.state_dict().items()}
    after.update({"te." + k: v for k, v in composer.pipe.text_encoder.state_dict().items()})
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert stacks.keys() == composer.runtime.layers.keys()
    for k, (down, up) in stacks.items():
        layer = composer.runtime.layers[k]
        assert torch.equal(layer.down, down) and torch.equal(layer.up, up) and not layer.fused
    for now, was in zip((composer.runtime.denoiser_mix.weights, composer.runtime.text_mix.weights), mixes):
        n = was.shape[1]  # the user's weights (a single row: merge's rows were all alike), derived slots at 0
        assert torch.equal(now[:, :n], was[:1].expand(now.shape[0], -1)) and not now[:, n:].any()
        assert (was == was[:1]).all()
    # and merge renders as before
    again = composer("a red circle", loras=[(files[0], 0.8), (files[1], 0.6)], strategy="merge", seed=0, **CALL)
    np.testing.assert_array_equal(again, merged)


def test_fused_and_unfused_agree(sd15_pipe, make_lora):
    files = [make_lora(sd15_pipe, n, rank=4, seed=i + 1, conv=True) for i, n in enumerate("ab")]
    composer = ComposerPipeline(sd15_pipe)
    loras = [(files[0], 0.8), (files[1], 0.6)]
    plain = composer("a red circle", loras=loras, strategy=_strategy(), seed=0, **CALL)
    fused = composer("a red circle", loras=loras, strategy=_strategy(), seed=0, fuse=True, **CALL)
    np.testing.assert_allclose(fused, plain, atol=1e-4)


def test_grams_come_from_the_disk_cache_the_second_time(sd15_pipe, make_lora, monkeypatch):
    files = [make_lora(sd15_pipe, n, rank=4, seed=i + 1) for i, n in enumerate("ab")]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    loras = [(files[0], 0.8), (files[1], 0.6)]
    calls = []
    real = stats.collect_grams
    monkeypatch.setattr(stats, "collect_grams", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    first = composer("a red circle", loras=loras, strategy=_strategy(), seed=0, **CALL)
    assert sorted(calls) == ["a", "b"]
    assert len(list((stats.cache_dir() / "activation-grams").glob("*.safetensors"))) == 2

    stats.clear_memory()  # a new process: only the disk cache is left
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    second = composer("a red circle", loras=loras, strategy=_strategy(), seed=0, **CALL)
    assert sorted(calls) == ["a", "b"]  # no collection pass
    np.testing.assert_array_equal(second, first)
    # another setting (or weight) is profiled anew
    composer("a red circle", loras=[(files[0], 0.5), (files[1], 0.6)], strategy=_strategy(), seed=0, **CALL)
    assert sorted(calls) == ["a", "a", "b"]


def test_scope_leaves_other_layers_plain(sd15_pipe, make_lora):
    files = [make_lora(sd15_pipe, n, rank=4, seed=i + 1) for i, n in enumerate("ab")]
    composer = ComposerPipeline(sd15_pipe)
    strat = _strategy(scope="kv")
    composer("a red circle", loras=[(files[0], 0.8), (files[1], 0.6)], strategy=strat, seed=0, **CALL)
    derived = strat.derived_adapters()["a"]
    for key, delta in composer.adapters["a"].deltas.items():
        same = derived.deltas[key].down is delta.down
        assert same == (
            not (key.startswith("text_encoder") or (".attn2." in key and key.endswith((".to_k", ".to_v"))))
        ), key


def test_bad_arguments_are_refused():
    from lora_composer.errors import ComposerError

    for args in ({"scope": "everything"}, {"alpha": -1}, {"templates": "no placeholder"}):
        with pytest.raises(ComposerError):
            get_strategy("activation-matched", **args)
