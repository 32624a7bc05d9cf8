"""Heatmaps of the adapter weights a generation actually applied: which adapter dominated when, and where.

The numbers come from the denoiser driver's history (one ``StepPlan`` per denoiser call), so they show
what ran, not what was asked for. A plan with several row groups (copies of the batch, not layer groups) contributes ``sum_g combine[g] *
weights[g, i]``: each adapter's share of the combined prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lora_composer.fusion.base import StepPlan


def _combine(plan: StepPlan) -> torch.Tensor:
    if plan.combine is not None:
        return plan.combine.float()
    return torch.full((plan.row_groups,), 1.0 / plan.row_groups)


def effective_weights(history: list[StepPlan]) -> torch.Tensor:
    """``[steps, adapters]``: each adapter's weight in the combined prediction at each denoiser call."""
    return torch.stack([_combine(p) @ p.weights.float() for p in history]) if history else torch.zeros(0, 0)


def layer_group_weights(history: list[StepPlan]) -> tuple[list[str], torch.Tensor] | None:
    """``(layer groups, [layer groups, adapters])``: weights per layer group averaged over the steps, or None."""
    plans = [p for p in history if p.layer_weights]
    if not plans:
        return None
    groups = list(dict.fromkeys(g for p in plans for g in p.layer_weights))
    rows = []
    for g in groups:
        per_step = [_combine(p) @ p.layer_weights.get(g, p.weights).float() for p in plans]
        rows.append(torch.stack(per_step).mean(dim=0))
    return groups, torch.stack(rows)


def _heatmap(ax, data, ylabels, xlabels, title, ylabel):
    ax.set_title(title)
    if data.size == 0:  # no LoRA acted: say so rather than draw an empty image
        ax.text(0.5, 0.5, "no LoRA in use", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    low, high = min(0.0, float(data.min(initial=0.0))), max(float(data.max(initial=0.0)), 1e-6)
    im = ax.imshow(data, aspect="auto", cmap="magma", interpolation="nearest", vmin=low, vmax=high)
    if data.size <= 120:  # small grids: print the numbers too
        for (y, x), v in np.ndenumerate(data):
            ax.text(
                x,
                y,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < low + 0.6 * (high - low) else "black",
            )
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right")
    step = max(1, len(ylabels) // 20)
    ax.set_yticks(range(0, len(ylabels), step), [ylabels[i] for i in range(0, len(ylabels), step)])
    ax.set_ylabel(ylabel)
    ax.figure.colorbar(im, ax=ax, label="weight applied")


def save_explanation(history: list[StepPlan], adapters: list[str], path, strategy: str = "") -> Path:
    """Write the heatmap PNG(s) to ``path``: steps x adapters, plus layer groups x adapters when used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = effective_weights(history)
    layers = layer_group_weights(history)
    panels = 2 if layers else 1
    fig, axes = plt.subplots(1, panels, figsize=(4 + 2.5 * panels + 0.4 * len(adapters), 4 + 0.12 * len(history)))
    axes = [axes] if panels == 1 else list(axes)
    _heatmap(
        axes[0],
        steps.numpy(),
        [str(i) for i in range(len(history))],
        adapters,
        f"{strategy or 'weights'}: per step",
        "denoiser call",
    )
    if layers:
        groups, data = layers
        _heatmap(axes[1], data.numpy(), groups, adapters, "per layer group (mean over steps)", "layer group")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
