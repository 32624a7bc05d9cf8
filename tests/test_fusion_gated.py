"""gated: prompt-response gates per layer group and timestep, checked against plain torch and merge."""

import copy

import numpy as np
import pytest
import torch

from lora_composer import tiny
from lora_composer.adapters.types import Adapter, LayerDelta
from lora_composer.errors import ComposerError
from lora_composer.fusion import StrategyContext
from lora_composer.pipeline import ComposerPipeline
from lora_composer.runtime import LoraRuntime
from lora_composer.fusion import get_strategy
from lora_composer.fusion.gated import GatedStrategy, gates_from_responses, layer_response, prompt_responses

CALL = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np")


def adapter_from_layers(name, layers, alpha, scale_of=lambda key: 1.0):
    """An Adapter from PEFT-format random layers; ``scale_of(key)`` multiplies each key's ``up``."""
    deltas = {}
    for comp, sd in layers.items():
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                full = f"{comp}.{module}"
                deltas[full] = LayerDelta(down, sd[f"{module}.lora_B.weight"] * scale_of(full), alpha)
    return Adapter(name, "sd15", deltas)


def test_layer_response_equals_plain_torch():
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen)
    e = torch.randn(2, 7, 5, generator=gen)
    dw = (6.0 / 3) * up @ down  # alpha 6, rank 3
    expected = torch.stack([torch.linalg.norm(dw @ tok) / torch.linalg.norm(tok) for tok in e.reshape(-1, 5)]).mean()
    got = layer_response(down, up, 6.0 / 3, e)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    # Groups: mean over the group's k/v layers (a missing delta counts 0), other layers ignored, groups
    # without cross-attention get the mean of the others.
    k, v = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "unet.mid_block.attentions.0.x.attn2.to_v"
    k2 = k.replace("to_k", "to_v")
    q = k.replace("attn2.to_k", "attn1.to_q")
    d = lambda s: LayerDelta(down * s, up, 6.0)  # noqa: E731
    a = Adapter("a", "sd15", {k: d(1.0), k2: d(2.0), v: d(0.5), q: d(9.0)})
    b = Adapter("b", "sd15", {k: d(3.0)})
    groups = ["unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block"]
    r = prompt_responses([a, b], groups, e)
    one = float(layer_response(down, up, 2.0, e))
    expected = torch.tensor([[(1.0 + 2.0) / 2 * one, 3.0 / 2 * one], [0, 0], [0.5 * one, 0.0]])
    expected[1] = (expected[0] + expected[2]) / 2
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=1e-5)


def test_gates_formula():
    r = torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.0, 0.0]])
    rel = r / r.mean(dim=0)
    rel[2] = 1e-6  # no reaction in that group from either: equal gates
    expected = 2 * torch.softmax(rel.log() / 2.0, dim=1)
    torch.testing.assert_close(gates_from_responses(r, temperature=2.0), expected.float(), atol=1e-6, rtol=1e-6)
    assert torch.equal(gates_from_responses(r, temperature=float("inf")), torch.ones(3, 2))
    # An adapter that reacts nowhere gets a neutral relative response (1) rather than 0.
    g = gates_from_responses(torch.tensor([[2.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(g, 2 * torch.softmax(torch.tensor([[4 / 3, 1.0], [2 / 3, 1.0]]).log(), dim=1))


def _encode(pipe, prompt="a red circle"):
    pos, neg = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True)[:2]
    return torch.cat([neg, pos])


def test_gates_follow_where_each_adapter_reacts(sd15_pipe):
    layers_a = tiny.random_lora_layers(sd15_pipe, seed=1, conv=True, text_encoder=False)
    layers_b = tiny.random_lora_layers(sd15_pipe, seed=2, rank=2, text_encoder=False)
    in_down = lambda key: ".down_blocks." in key  # noqa: E731
    # A: k/v deltas in the down blocks, ~0 elsewhere; B the reverse. A is much louder overall (alpha 16 vs 1).
    a = adapter_from_layers("a", layers_a, alpha=16, scale_of=lambda k: 1.0 if in_down(k) else 1e-4)
    b = adapter_from_layers("b", layers_b, alpha=1, scale_of=lambda k: 1e-4 if in_down(k) else 1.0)
    rt = LoraRuntime(sd15_pipe)
    rt.add(a)
    rt.add(b)
    ehs = _encode(sd15_pipe)
    for per_adapter in (True, False):
        strat = GatedStrategy(schedule="constant", per_adapter=per_adapter)
        strat.begin(["a", "b"], [0.8, 0.5], 2, StrategyContext(adapters=[a, b], runtime=rt, pipe=sd15_pipe))
        strat.observe(0, 900.0, {"sample": None, "encoder_hidden_states": ehs})
        plan = strat.plan(0, 900.0)
        groups = rt.layer_groups()
        assert set(plan.layer_weights) == set(groups) and "unet.down_blocks.1" in groups  # conv-only group
        cross = ["unet.down_blocks.0", "unet.mid_block", "unet.up_blocks.1"]
        gates = {g: strat.trace[-1][strat.layer_groups.index(g)] for g in cross}
        assert gates["unet.down_blocks.0"][0] > 1.5 > 0.5 > gates["unet.down_blocks.0"][1]
        for g in ("unet.mid_block", "unet.up_blocks.1"):
            assert gates[g][1] > 1.5 > 0.5 > gates[g][0] or not per_adapter
        r = strat.responses
        torch.testing.assert_close(
            r[strat.layer_groups.index("unet.down_blocks.1")], r[[strat.layer_groups.index(g) for g in cross]].mean(0)
        )
        w = plan.layer_weights["unet.down_blocks.0"][0]
        torch.testing.assert_close(w, torch.tensor([0.8, 0.5]) * gates["unet.down_blocks.0"])
    # Without per-adapter normalisation the loud adapter (alpha 16 on rank 4) wins everywhere but B's home
    # groups still lean to B more than A's home group does.
    assert gates["unet.up_blocks.1"][1] > gates["unet.down_blocks.0"][1]
    # Responses come from the conditional half of the CFG batch ([negative, positive]) only.
    strat.begin(["a", "b"], [0.8, 0.5], 2, StrategyContext(adapters=[a, b], runtime=rt, pipe=sd15_pipe))
    strat.observe(0, 900.0, {"encoder_hidden_states": torch.cat([torch.randn_like(ehs[1:]) * 50, ehs[1:]])})
    torch.testing.assert_close(strat.responses, prompt_responses([a, b], strat.layer_groups, ehs[1:]))
    # The response is computed once per generation: a second observe with other inputs changes nothing.
    before = strat.responses.clone()
    strat.observe(1, 500.0, {"encoder_hidden_states": torch.randn_like(ehs)})
    assert torch.equal(strat.responses, before)


def test_schedules():
    early, late, const = (GatedStrategy(schedule=s) for s in ("early", "late", "constant"))
    for s in (early, late, const):
        s.begin(["a"], [1.0], 4, StrategyContext())
    assert early.blend(0, 999.0) > early.blend(3, 10.0) and late.blend(0, 999.0) < late.blend(3, 10.0)
    assert const.blend(0, 999.0) == const.blend(3, 10.0) == 1.0
    assert early.blend(0, None) == 1.0 and early.blend(3, None) == 0.0  # no timestep: the step fraction
    assert GatedStrategy(strength=0.5, schedule="constant").strength == 0.5
    assert get_strategy("gated", temperature="inf").temperature == float("inf")
    for bad in ({"temperature": 0}, {"strength": 2}, {"schedule": "sometimes"}, {"nope": 1}):
        with pytest.raises(ComposerError):
            get_strategy("gated", **bad)


def test_uniform_gates_equal_merge_and_gates_change_the_image(sd15_pipe, make_lora):
    files = [make_lora(sd15_pipe, n, seed=i + 1, conv=True, alpha=4 * (i + 1)) for i, n in enumerate("ab")]
    loras = [(files[0], 0.7), (files[1], 0.4)]
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    merged = composer("a red circle", loras=loras, seed=0, progress=False, **CALL)
    uniform = composer(
        "a red circle",
        loras=loras,
        strategy="gated",
        strategy_args={"temperature": float("inf")},
        seed=0,
        progress=False,
        **CALL,
    )
    assert np.abs(uniform - merged).max() < 1e-5
    off = composer(
        "a red circle", loras=loras, strategy="gated", strategy_args={"strength": 0.0}, seed=0, progress=False, **CALL
    )
    assert np.abs(off - merged).max() < 1e-5

    gated = composer(
        "a red circle",
        loras=loras,
        strategy="gated",
        strategy_args={"schedule": "constant"},
        seed=0,
        progress=False,
        **CALL,
    )
    history = composer.last_driver.history
    assert len(history) == CALL["num_inference_steps"]
    table = torch.stack([history[0].layer_weights[g][0] for g in composer.runtime.layer_groups()])
    assert not torch.allclose(table, torch.tensor([0.7, 0.4]).expand_as(table))  # really per layer group
    assert np.abs(gated - merged).max() > 1e-4
    assert composer.last_record.strategy == "gated" and composer.last_record.strategy_args["schedule"] == "constant"


def test_runs_on_sdxl(sdxl_pipe, make_lora):
    files = [make_lora(sdxl_pipe, n, seed=i + 1) for i, n in enumerate("ab")]
    composer = ComposerPipeline(copy.deepcopy(sdxl_pipe))
    out = composer(
        "a red circle", loras=[(files[0], 0.7), (files[1], 0.4)], strategy="gated", seed=0, progress=False, **CALL
    )
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    history = composer.last_driver.history
    groups = composer.runtime.layer_groups()
    assert len(history) == CALL["num_inference_steps"] and set(history[0].layer_weights) == set(groups)
    strat_trace = [torch.stack([p.layer_weights[g][0] for g in groups]) for p in history]
    assert all(t.shape == (len(groups), 2) and torch.isfinite(t).all() for t in strat_trace)
    assert not torch.allclose(strat_trace[0], strat_trace[-1])  # "early": the gates fade towards merge


# -- DiT pipelines (tiny FLUX.1 and SD3): gates from the joint attention's trigger tokens ----------------------
TRIGGERS = {"a": "zqx", "b": "vmk"}  # new words: the T5 tokenizer spells them letter by letter, CLIP in two pieces
DIT_CALL = dict(num_inference_steps=2, height=16, width=16, output_type="np", max_sequence_length=32)
DIT_GUIDANCE = {"flux": 3.5, "sd3": 5.0}  # FLUX.1-dev's distilled guidance (no CFG batch); SD3's CFG
DIT_WEIGHTS = (0.8, 0.6)


@pytest.fixture(scope="module")
def dit_templates(one_thread):
    from lora_composer import tiny_dit

    return {"flux": tiny_dit.build_tiny_flux_pipeline(seed=0), "sd3": tiny_dit.build_tiny_sd3_pipeline(seed=0)}


@pytest.fixture(params=["flux", "sd3"])
def dit(request, dit_templates, tmp_path):
    """``(family, pipe, files)``: two random LoRAs on every transformer Linear and the CLIP encoders, each with
    a trigger word in an A1111 sidecar (``a.json``)."""
    import json

    from lora_composer import tiny_dit

    family = request.param
    pipe = copy.deepcopy(dit_templates[family])
    text = ("text_encoder",) if family == "flux" else ("text_encoder", "text_encoder_2")
    files = {}
    for i, (name, alpha) in enumerate((("a", 8), ("b", 4))):
        layers = tiny_dit.random_dit_lora_layers(pipe, rank=4, seed=i + 1, text_encoders=text)
        files[name] = tiny_dit.save_dit_diffusers_lora(
            pipe, layers, tmp_path / f"{name}.safetensors", rank=4, alpha=alpha
        )
        (tmp_path / f"{name}.json").write_text(json.dumps({"activation text": TRIGGERS[name]}))
    return family, pipe, files


def _dit_render(composer, family, files, prompt, **kwargs):
    loras = list(zip(files.values(), DIT_WEIGHTS))
    return composer(
        prompt, loras=loras, seed=0, progress=False, guidance_scale=DIT_GUIDANCE[family], **{**DIT_CALL, **kwargs}
    )


def _find(ids, word_ids):
    """Start positions of ``word_ids`` inside ``ids`` (plain list search)."""
    n = len(word_ids)
    return [j for j in range(len(ids) - n + 1) if list(ids[j : j + n]) == list(word_ids)]


def _reference_positions(pipe, family, prompt, word):
    """The trigger word's token positions in the transformer's text tokens, by searching its token ids in the
    prompt's (independent of the offsets the strategy reads): FLUX.1 T5 only; SD3 CLIP (77) then T5."""
    n = DIT_CALL["max_sequence_length"]
    segments = [(0, pipe.tokenizer_2, n)] if family == "flux" else [(0, pipe.tokenizer, 77), (77, pipe.tokenizer_3, n)]
    out = []
    for offset, tok, length in segments:
        ids = tok(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        word_ids = tok(word, add_special_tokens=False).input_ids
        out += [offset + j + m for j in _find(ids, word_ids) for m in range(len(word_ids))]
    return out


class _SdpaRecorder:
    """Keeps the query and key of every scaled_dot_product_attention call the transformer makes (its joint
    attentions: ``[rows, heads, tokens, d]``), for an attention probability computed here by hand."""

    def __init__(self, monkeypatch, transformer):
        self.calls, self.inside = [], False
        real = torch.nn.functional.scaled_dot_product_attention

        def sdpa(query, key, value, *args, **kwargs):
            if self.inside:
                self.calls.append((query.detach().clone(), key.detach().clone()))
            return real(query, key, value, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        self.handles = [
            transformer.register_forward_pre_hook(lambda *a: setattr(self, "inside", True)),
            transformer.register_forward_hook(lambda *a: setattr(self, "inside", False)),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def _reference_gates(calls, family, positions, groups, blocks, temperature=1.0):
    """Per layer group, adapter: the mean over conditional rows, heads and image queries of the mean softmax
    probability on the adapter's trigger tokens; groups without attention get the blocks' mean; gates =
    n * softmax(log(max(r / max r, 1e-6)) / temperature)."""
    n_text = DIT_CALL["max_sequence_length"] + (0 if family == "flux" else 77)
    r = torch.zeros(len(groups), len(positions))
    for (q, k), group in zip(calls, blocks):
        if family == "sd3":  # CFG batch [negative, positive]; keys are [image, text]
            q, k = q[q.shape[0] // 2 :], k[k.shape[0] // 2 :]
            n_img = q.shape[2] - n_text
            q_img, text_at = q[:, :, :n_img], n_img
        else:  # [text, image], one stream
            q_img, text_at = q[:, :, n_text:], 0
        probs = torch.softmax(q_img.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        for i, pos in enumerate(positions):
            if pos:
                r[groups.index(group), i] = probs[..., [text_at + p for p in pos]].mean(-1).mean().float()
    measured = [groups.index(g) for g in blocks]
    rest = [g for g in range(len(groups)) if g not in measured]
    r[rest] = r[measured].mean(0)
    rel = (r / r.max()).clamp_min(1e-6)
    return r, len(positions) * torch.softmax(rel.log() / temperature, dim=1)


@pytest.mark.parametrize("prompt", ["zqx vmk, a red circle", "a red circle, zqx"])
def test_dit_gates_follow_the_attention_on_trigger_words(dit, monkeypatch, prompt):
    family, pipe, files = dit
    composer = ComposerPipeline(copy.deepcopy(pipe))
    merged = _dit_render(composer, family, files, prompt)
    recorder = _SdpaRecorder(monkeypatch, composer.pipe.transformer)
    gated = _dit_render(composer, family, files, prompt, strategy="gated", strategy_args={"schedule": "constant"})
    recorder.remove()
    strat = composer.last_driver.strategy
    blocks = (
        ["transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"]
        if family == "flux"
        else ["transformer.transformer_blocks.0", "transformer.transformer_blocks.1"]
    )
    assert len(recorder.calls) == len(blocks) * DIT_CALL["num_inference_steps"]
    positions = [_reference_positions(composer.pipe, family, prompt, TRIGGERS[n]) for n in "ab"]
    assert positions[0] and bool(positions[1]) == ("vmk" in prompt)
    assert strat._positions == positions
    groups = strat.layer_groups
    r, expected = _reference_gates(recorder.calls[: len(blocks)], family, positions, groups, blocks)
    torch.testing.assert_close(strat.attention[0], r, rtol=1e-4, atol=1e-7)
    assert torch.equal(strat.trace[0], torch.ones(len(groups), 2))  # the first call runs at the user's weights
    torch.testing.assert_close(strat.trace[1], expected, rtol=1e-4, atol=1e-5)  # measured in call 1, acting in 2
    w = composer.last_driver.history[1].layer_weights[blocks[0]][0]
    torch.testing.assert_close(w, torch.tensor(DIT_WEIGHTS) * strat.trace[1][groups.index(blocks[0])])
    if "vmk" not in prompt:  # b's trigger word is not in the prompt: b gated down to ~0, a up to ~2
        assert (strat.trace[1][:, 1] < 1e-3).all() and (strat.trace[1][:, 0] > 1.99).all()
        assert np.abs(gated - merged).max() > 1e-3  # and the picture changes
    else:  # both present: gates near 1 that still differ per block
        assert not torch.allclose(strat.trace[1], torch.ones_like(strat.trace[1]), atol=1e-3)
        assert np.abs(gated - merged).max() > 0


def test_dit_gated_render_equals_diffusers_with_the_gated_weights(dit):
    """a's trigger word only: after the first call the gates are (2, 0) in every block, so the render is
    diffusers' own LoRA loading with set_adapters switched to (2 w_a, 0) at the end of step 1."""
    family, pipe, files = dit
    prompt = "a red circle, zqx"
    composer = ComposerPipeline(copy.deepcopy(pipe))
    gated = _dit_render(composer, family, files, prompt, strategy="gated", strategy_args={"schedule": "constant"})
    ref = copy.deepcopy(pipe)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(list(files), list(DIT_WEIGHTS))

    def callback(p, step_index, timestep, callback_kwargs):
        p.set_adapters(list(files), [2 * DIT_WEIGHTS[0], 0.0])
        return {}

    expected = ref(
        prompt=prompt,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=callback,
        guidance_scale=DIT_GUIDANCE[family],
        **DIT_CALL,
    ).images
    assert np.abs(gated - expected).max() < 1e-4
    merged = _dit_render(composer, family, files, prompt)
    assert np.abs(gated - merged).max() > 1e-3


def test_dit_pipeline_restored_exactly(dit):
    family, pipe, files = dit
    composer = ComposerPipeline(copy.deepcopy(pipe))
    transformer = composer.pipe.transformer
    before = _dit_render(composer, family, files, "a red circle, zqx")
    processors = dict(transformer.attn_processors)
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in transformer.named_modules()}
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    pipe_attrs = set(vars(composer.pipe))
    seen = {}

    def spy(*args, **kwargs):  # during the call: the processors really are wrapped
        seen["processors"] = dict(transformer.attn_processors)
        return {}

    _dit_render(composer, family, files, "a red circle, zqx", strategy="gated", callback_on_step_end=spy)
    assert composer.last_driver.strategy.attention  # it measured something
    assert all(seen["processors"][k] is not p for k, p in processors.items())
    assert all(transformer.attn_processors[k] is p for k, p in processors.items())
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in transformer.named_modules()} == hooks
    assert set(vars(composer.pipe)) == pipe_attrs and "encode_prompt" not in vars(composer.pipe)
    assert all(torch.equal(v, weights[k]) for k, v in transformer.state_dict().items())
    assert np.array_equal(_dit_render(composer, family, files, "a red circle, zqx"), before)

    # ... and on an error inside the call
    strat = GatedStrategy()
    strat.begin(["a"], [1.0], 2, StrategyContext(pipe=composer.pipe))
    with pytest.raises(RuntimeError):
        with strat.patched(transformer):
            assert all(transformer.attn_processors[k] is not p for k, p in processors.items())
            raise RuntimeError("boom")
    assert all(transformer.attn_processors[k] is p for k, p in processors.items())
    assert "encode_prompt" not in vars(composer.pipe)


def test_trigger_attention_and_neutral_gates(monkeypatch):
    import lora_composer.fusion.gated as gated

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 4, generator=gen), torch.randn(2, 9, 3, 4, generator=gen)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, dim=-1)  # d = 4
    expected = torch.stack([probs[..., [1, 4]].mean(-1).mean(), probs[..., [0]].mean(), torch.tensor(0.0)])
    torch.testing.assert_close(gated.trigger_attention(q, k, [[1, 4], [0], []]), expected)
    monkeypatch.setattr(gated, "_CHUNK", 7)  # queries one at a time: the same
    torch.testing.assert_close(gated.trigger_attention(q, k, [[1, 4], [0], []]), expected)
    # adapters without trigger words keep gate 1; fewer than two with trigger words: every gate 1
    strat = GatedStrategy()
    strat.begin(["a", "b", "c"], [1.0, 1.0, 1.0], 2, StrategyContext(layer_groups=["g"]))
    r = torch.tensor([[0.02, 0.5, 0.0]])
    strat._positions = [[3], None, []]
    torch.testing.assert_close(strat.dit_gates(r), torch.tensor([[2 / (1 + 1e-6), 1.0, 2e-6 / (1 + 1e-6)]]))
    strat._positions = [[3], None, None]
    assert torch.equal(strat.dit_gates(r), torch.ones(1, 3))
