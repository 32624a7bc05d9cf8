"""regional (one row group per region, combined by the regions' masks) against a hand-written reference.

End to end: the tiny SD1.5 pipeline with the adapters loaded through diffusers/PEFT. The reference encodes each
region's prompt with PEFT's ``set_adapters`` at that region's adapters, and its UNet forward runs each region's
adapters on that region's embeddings and pastes the outputs into the region's columns (or rows) by slicing,
independently of the strategy's code.
"""

import copy

import numpy as np
import pytest
import torch

from lora_composer.errors import ComposerError
from lora_composer.fusion.regional import level_size, region_masks
from lora_composer.pipeline import ComposerPipeline
from lora_composer.prompt_syntax import split_regions

STEPS = 3
CALL = dict(num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, output_type="np")


def test_split_regions():
    assert split_regions("a BREAK b") == ("", ["a", "b"])
    assert split_regions("sky, ADDCOMM a cat <lora:x:0.5>, BREAK a dog") == ("sky", ["a cat <lora:x:0.5>", "a dog"])
    assert split_regions("one picture") == ("", ["one picture"])
    assert split_regions("a breakfast BREAK b") == ("", ["a breakfast", "b"])  # the keyword, not the word
    with pytest.raises(ComposerError, match="region 2 of 3"):
        split_regions("a BREAK BREAK c")
    with pytest.raises(ComposerError, match="ADDCOMM appears more than once"):
        split_regions("a ADDCOMM b ADDCOMM c BREAK d")


@pytest.mark.parametrize(
    "split, ratios, h, w", [("cols", [1, 1], 4, 6), ("cols", [2, 1, 1], 3, 8), ("rows", [1, 3], 8, 5)]
)
def test_region_masks_are_bands_in_reading_order(split, ratios, h, w):
    masks = region_masks(h, w, ratios, split).numpy()
    size = w if split == "cols" else h
    start = 0
    for r, ratio in enumerate(ratios):
        stop = round(size * sum(ratios[: r + 1]) / sum(ratios))
        want = np.zeros((h, w))
        if split == "cols":
            want[:, start:stop] = 1
        else:
            want[start:stop, :] = 1
        assert np.array_equal(masks[r], want), r
        start = stop
    assert np.array_equal(masks.sum(0), np.ones((h, w)))


class _MaskedSelfAttention:
    """diffusers' own attention with an additive block-diagonal mask: a token attends only to the tokens of its
    region (``bounds`` along the columns, at each level's size)."""

    def __init__(self, bounds, latent):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.bounds, self.latent = AttnProcessor2_0(), bounds, latent

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        n = hidden_states.shape[1]
        h, w = self.latent
        while h * w > n:
            h, w = (h + 1) // 2, (w + 1) // 2
        region = torch.zeros(h, w, dtype=torch.long)
        for r, (lo, hi) in enumerate(self.bounds):
            region[:, round(lo * w) : round(hi * w)] = r
        same = region.flatten()[:, None] == region.flatten()[None, :]
        bias = torch.zeros(n, n).masked_fill(~same, float("-inf"))
        return self.inner(attn, hidden_states, None, bias.expand(hidden_states.shape[0], n, n), **kwargs)


def _reference(pipe, files, regions, split, bounds, negative=None, guidance=5.0, bounded=False):
    """diffusers + PEFT. ``regions``: ``[(prompt, {adapter: weight})]``; ``bounds``: each region's band
    ``(start, stop)`` along the split's axis, as fractions of the latent's size."""
    ref = copy.deepcopy(pipe)
    names = list(files)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    cfg = guidance > 1
    encoded = []
    for text, weights in regions:
        if names:
            ref.set_adapters(names, [weights.get(n, 0.0) for n in names])
        out = ref.encode_prompt(
            text,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative,
        )
        pooled = None if len(out) == 2 else torch.cat([out[3], out[2]]) if cfg else out[2]  # SDXL's pooled prompt
        encoded.append((torch.cat([out[1], out[0]]) if cfg else out[0], pooled))
    unet = ref.unet
    forward = unet.forward

    def regional(sample, timestep, encoder_hidden_states=None, **kwargs):
        out = None
        for (text, weights), (embeds, pooled), (lo, hi) in zip(regions, encoded, bounds):
            if names:
                unet.set_adapters(names, [weights.get(n, 0.0) for n in names])
            if pooled is not None:
                kwargs["added_cond_kwargs"] = {**kwargs["added_cond_kwargs"], "text_embeds": pooled}
            result = forward(sample, timestep, encoder_hidden_states=embeds, **kwargs)
            pred = result[0] if isinstance(result, tuple) else result.sample
            out = torch.zeros_like(pred) if out is None else out
            size = pred.shape[-1] if split == "cols" else pred.shape[-2]
            lo, hi = round(lo * size), round(hi * size)
            if split == "cols":
                out[..., :, lo:hi] = pred[..., :, lo:hi]
            else:
                out[..., lo:hi, :] = pred[..., lo:hi, :]
        return (out,) if isinstance(result, tuple) else type(result)(sample=out)

    unet.forward = regional
    if bounded:
        latent = (CALL["height"] // ref.vae_scale_factor, CALL["width"] // ref.vae_scale_factor)
        unet.set_attn_processor(
            {
                name: _MaskedSelfAttention(bounds, latent) if ".attn1." in name else proc
                for name, proc in unet.attn_processors.items()
            }
        )
    return ref(
        prompt="unused",
        negative_prompt=negative,
        generator=torch.Generator().manual_seed(0),
        **{**CALL, "guidance_scale": guidance},
    ).images


@pytest.fixture
def files(sd15_pipe, make_lora):
    return {n: make_lora(sd15_pipe, n, rank=4, alpha=4 + i, seed=i + 1, conv=(i == 0)) for i, n in enumerate("abc")}


def test_regional_matches_the_reference(sd15_pipe, files):
    """Two columns, each with its own LoRA; ``c`` passed outside the prompt acts in both; shared attention."""
    prompt = f"a red circle <lora:{files['a']}:0.8> BREAK a blue square <lora:{files['b']}:1.2>"
    regions = [("a red circle", {"a": 0.8, "c": 0.7}), ("a blue square", {"b": 1.2, "c": 0.7})]
    expected = _reference(sd15_pipe, files, regions, "cols", [(0, 0.5), (0.5, 1)], negative="blurry")

    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    got = composer(
        prompt,
        negative_prompt="blurry",
        loras=[(files["c"], 0.7)],
        strategy="regional",
        strategy_args={"attention": "shared"},
        seed=0,
        progress=False,
        **CALL,
    )
    assert composer.last_driver.rows == STEPS * 2 * 2  # one pass a step: CFG's 2 rows x 2 regions
    assert np.abs(got - expected).max() < 1e-4
    record = composer.last_record.strategy_args
    assert [r["prompt"] for r in record["regions"]] == ["a red circle", "a blue square"]
    assert record["regions"][0]["loras"] == {"c": 0.7, "a": 0.8}
    merged = composer(
        "a red circle, a blue square", loras=[(files[n], 1.0) for n in "abc"], seed=0, progress=False, **CALL
    )
    assert np.abs(got - merged).max() > 1e-3  # not merge: the comparison means something


def test_bounded_attention_matches_a_masked_reference(sd15_pipe, files):
    """``attention=bounded``: self-attention within each region, against diffusers' attention under a mask."""
    prompt = f"a red circle <lora:{files['a']}:0.8> BREAK a blue square <lora:{files['b']}>"
    regions = [("a red circle", {"a": 0.8}), ("a blue square", {"b": 1.0})]
    expected = _reference(sd15_pipe, files, regions, "cols", [(0, 0.5), (0.5, 1)], bounded=True)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    unet = composer.pipe.unet
    got = composer(prompt, strategy="regional", seed=0, progress=False, **CALL)  # bounded: the default
    assert np.abs(got - expected).max() < 1e-4
    assert composer.last_record.strategy_args["attention"] == "bounded"
    assert not any("forward" in vars(m) for m in unet.modules())  # the layers are given back as they were
    shared = composer(
        prompt, strategy="regional", strategy_args={"attention": "shared"}, seed=0, progress=False, **CALL
    )
    assert np.abs(got - shared).max() > 1e-3


def test_command_line_arguments():
    """``--strategy-arg ratios=2,1`` arrives as the tuple (2, 1)."""
    from lora_composer.fusion import get_strategy
    from lora_composer.fusion.registry import parse_strategy_args

    strat = get_strategy("regional", **parse_strategy_args("ratios=2,1 split=rows attention=shared"))
    assert (strat.ratios, strat.split, strat.attention) == ([2.0, 1.0], "rows", "shared")
    assert get_strategy("regional", ratios="3,1").ratios == [3.0, 1.0]
    with pytest.raises(ComposerError, match="ratios must be positive numbers"):
        get_strategy("regional", **parse_strategy_args("ratios=2,0"))


def test_level_size():
    assert level_size(8, 16, 128) == (8, 16) and level_size(8, 16, 8) == (2, 4)
    assert level_size(5, 7, 12) == (3, 4)  # odd sides round up, as the UNet's downsampling does
    assert level_size(8, 8, 77) is None  # text tokens: not a level


def test_regional_on_sdxl_matches_the_reference(sdxl_pipe, make_lora):
    """SDXL: each region's pooled prompt goes with its embeddings."""
    files = {n: make_lora(sdxl_pipe, n, rank=4, seed=i + 1) for i, n in enumerate("ab")}
    regions = [("a red circle", {"a": 1.0}), ("a blue square", {"b": 0.9})]
    expected = _reference(sdxl_pipe, files, regions, "cols", [(0, 0.5), (0.5, 1)], bounded=True)
    composer = ComposerPipeline(copy.deepcopy(sdxl_pipe))
    prompt = f"a red circle <lora:{files['a']}> BREAK a blue square <lora:{files['b']}:0.9>"
    got = composer(prompt, strategy="regional", seed=0, progress=False, **CALL)
    assert np.abs(got - expected).max() < 1e-4
    swapped = composer(
        f"a blue square <lora:{files['b']}:0.9> BREAK a red circle <lora:{files['a']}>",
        strategy="regional",
        seed=0,
        progress=False,
        **CALL,
    )
    assert np.abs(got - swapped).max() > 1e-3


def test_regional_rows_ratios_and_common_text(sd15_pipe, files):
    """Stacked regions 3:1; the text before ADDCOMM and its tag belong to both regions; no guidance."""
    prompt = f"on a striped background <lora:{files['c']}> ADDCOMM a star <lora:{files['a']}> BREAK a cross"
    regions = [
        ("on a striped background, a star", {"a": 1.0, "c": 1.0}),
        ("on a striped background, a cross", {"c": 1.0}),
    ]
    expected = _reference(sd15_pipe, files, regions, "rows", [(0, 0.75), (0.75, 1)], guidance=1.0)
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    kwargs = {**CALL, "guidance_scale": 1.0}
    args = {"split": "rows", "ratios": "3,1", "attention": "shared"}
    got = composer(prompt, strategy="regional", strategy_args=args, seed=0, progress=False, **kwargs)
    assert np.abs(got - expected).max() < 1e-4
    chunked = composer(prompt, strategy="regional", strategy_args=args, seed=0, progress=False, max_batch=1, **kwargs)
    assert composer.last_driver.calls == 2 * STEPS  # one region per pass, each with its own embeddings
    assert np.abs(chunked - got).max() < 1e-5


def test_identical_regions_are_merge(sd15_pipe, files):
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    tag = f"<lora:{files['a']}:0.9>"
    got = composer(
        f"a red circle {tag} BREAK a red circle {tag}",
        strategy="regional",
        strategy_args={"attention": "shared"},
        seed=0,
        progress=False,
        **CALL,
    )
    merged = composer(f"a red circle {tag}", seed=0, progress=False, **CALL)
    assert np.abs(got - merged).max() < 1e-5


def test_regional_input_errors_are_one_line(sd15_pipe, files):
    composer = ComposerPipeline(copy.deepcopy(sd15_pipe))
    cases = [
        (dict(prompt="a red circle"), "needs a prompt split into regions with BREAK"),
        (dict(prompt="a BREAK b", strategy_args={"ratios": "1,1,1"}), "ratios give 3 regions, the prompt has 2"),
        (dict(prompt="a BREAK  BREAK b"), "region 2 of 3 in the prompt is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ComposerError, match=message) as err:
            composer(strategy="regional", seed=0, progress=False, **{**CALL, **kwargs})
        assert "\n" not in str(err.value)
    with pytest.raises(ComposerError, match="split must be 'cols' or 'rows'"):
        composer("a BREAK b", strategy="regional", strategy_args={"split": "diagonal"}, progress=False, **CALL)
    with pytest.raises(ComposerError, match="attention must be 'shared' or 'bounded'"):
        composer("a BREAK b", strategy="regional", strategy_args={"attention": "none"}, progress=False, **CALL)


def test_regional_refuses_a_dit_in_one_line():
    from lora_composer import tiny_dit

    composer = ComposerPipeline(tiny_dit.build_tiny_sd3_pipeline(seed=0))
    with pytest.raises(ComposerError, match="runs on UNet pipelines .* not on StableDiffusion3Pipeline") as err:
        composer(
            "a red circle BREAK a blue square",
            strategy="regional",
            num_inference_steps=1,
            height=32,
            width=32,
            max_sequence_length=16,
            progress=False,
        )
    assert "\n" not in str(err.value)


def test_loras_auto_picks_each_regions_loras_from_its_words(home):
    """On the mini world's library: the retriever reads each region's text (the common text first)."""
    from lora_composer.miniworld import assets

    composer = ComposerPipeline.from_pretrained(assets.model_dir(), library=assets.library_dir())
    prompt = "on a wavy background ADDCOMM a purple star BREAK blinky, a red circle"
    composer(
        prompt, loras="auto", strategy="regional", seed=0, num_inference_steps=1, width=128, height=64, progress=False
    )
    regions = composer.last_record.strategy_args["regions"]
    assert [r["prompt"] for r in regions] == [
        "on a wavy background, a purple star",
        "on a wavy background, blinky, a red circle",
    ]
    assert [sorted(r["loras"]) for r in regions] == [
        ["purple-colour", "star-shape", "wavy-bg"],
        ["blinky-character", "wavy-bg"],
    ]
    assert sorted(m.name for m in composer.last_retrieval) == [
        "blinky-character",
        "purple-colour",
        "star-shape",
        "wavy-bg",
    ]
    words = composer.adapters["star-shape"].metadata.trigger_words
    composer(
        "a circle BREAK a square <lora:star-shape>",
        strategy="regional",
        append_trigger_words=True,
        seed=0,
        num_inference_steps=1,
        width=128,
        height=64,
        progress=False,
    )
    regions = composer.last_record.strategy_args["regions"]
    assert words and regions[0]["prompt"] == "a circle"  # each region gets its own LoRAs' trigger words only
    assert regions[1]["prompt"] == ", ".join(["a square", *[w for w in dict.fromkeys(words) if w not in "a square"]])
