"""Weights heatmaps: the numbers plotted are the weights the driver applied."""

import torch
from PIL import Image

from lora_composer.explain import effective_weights, layer_group_weights, save_explanation
from lora_composer.fusion.base import StepPlan


def test_effective_weights_follow_row_groups_and_combine():
    history = [
        StepPlan(torch.tensor([[0.8, 0.5]])),
        StepPlan(torch.tensor([[1.0, 0.0], [0.0, 1.0]])),  # two row groups, averaged
        StepPlan(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), combine=torch.tensor([0.75, 0.25])),
    ]
    expected = torch.tensor([[0.8, 0.5], [0.5, 0.5], [0.75, 0.25]])
    torch.testing.assert_close(effective_weights(history), expected)


def test_layer_groups_are_averaged_over_steps(tmp_path):
    w = torch.tensor([[1.0, 1.0]])
    history = [
        StepPlan(w, layer_weights={"unet.down_blocks.0": torch.tensor([[1.0, 0.0]])}),
        StepPlan(w, layer_weights={"unet.down_blocks.0": torch.tensor([[0.0, 0.0]])}),
    ]
    groups, data = layer_group_weights(history)
    assert groups == ["unet.down_blocks.0"]
    torch.testing.assert_close(data, torch.tensor([[0.5, 0.0]]))
    path = save_explanation(history, ["a", "b"], tmp_path / "x.explain.png", "gated")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300


def test_no_lora_gives_a_labelled_panel_without_warnings(tmp_path):
    import warnings

    history = [StepPlan(torch.zeros(1, 0)) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "identical low and high xlims" for an empty image
        path = save_explanation(history, [], tmp_path / "none.explain.png", "merge")
    with Image.open(path) as im:
        assert im.format == "PNG"
