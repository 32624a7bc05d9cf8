"""switch: one adapter at a time, taking turns during denoising (LoRA Switch).

LoRA Switch is one of the two training-free composition methods of Zhong et al. 2024, "Multi-LoRA
Composition for Image Generation" (arXiv 2402.16843). Instead of adding every adapter's delta to the
denoiser at once (merge), exactly one adapter is active on each step, at its user weight, and the
active adapter rotates round-robin every ``every`` steps.
"""

from __future__ import annotations

import torch

from lora_composer.errors import ComposerError
from lora_composer.fusion.base import StepPlan, Strategy, StrategyContext


class SwitchOrderError(ComposerError, ValueError):
    """``order`` names an adapter that is not part of the generation (or names one twice)."""


def _parse_order(order) -> list[str] | None:
    """``None``, ``"a,b"`` (the CLI form) or a list of names -> list of names (``None`` when not given)."""
    if order is None:
        return None
    if isinstance(order, str):
        names = [part.strip() for part in order.split(",")]
    elif isinstance(order, (list, tuple)):
        if not all(isinstance(part, str) for part in order):
            raise ValueError(f"order must list adapter names, got {list(order)!r}")
        names = [part.strip() for part in order]
    else:
        raise ValueError(f"order must be adapter names (a list or 'a,b'), got {type(order).__name__}")
    names = [n for n in names if n]
    if not names:
        return None
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"order names {', '.join(duplicates)} more than once")
    return names


class SwitchStrategy(Strategy):
    """LoRA Switch: one adapter active per step, at its user weight, changing every ``every`` steps.

    Step ``s`` (0-based denoiser call) uses ``order[(s // every) % len(order)]``; every other adapter is at
    weight 0 on that step. Each step costs one plain denoiser pass, the same as merge.

    When to choose it: several LoRAs that each carry a distinct element (a character, a garment, a style)
    and interfere when their deltas are summed (merge), where composite's one pass per adapter per step is
    too expensive. The paper reports both switch and composite ahead of merge, more clearly as the number
    of LoRAs grows. With one adapter it is the same as merge.

    - ``every`` (default 5): steps each adapter stays active before the next takes over. The default is
      the reference implementation's ``--switch_step`` default (5, with 200 DPM-Solver++ steps there);
      with few steps, choose a smaller value so that every adapter gets turns.
    - ``order`` (default: the adapters in the order given): the rotation, as adapter names (a list, or
      ``"a,b"`` from the CLI). Adapters it leaves out take their turns after the ones it names, in the
      order given. Unknown names are rejected when the generation starts, listing the adapters.

    The reference code switches in a ``callback_on_step_end`` when ``step_index % switch_step == 0`` for
    ``step_index > 0``, so its first adapter runs ``switch_step + 1`` steps; here every turn, the first
    included, lasts exactly ``every`` steps (the schedule the paper describes). As in the reference, the
    prompt is encoded once with the first adapter of the rotation alone (``text_mask``).
    """

    name = "switch"

    def __init__(self, every: int = 5, order: str | list | None = None):
        if isinstance(every, bool) or not isinstance(every, (int, float)) or int(every) != every:
            raise ValueError(f"every must be a whole number of steps >= 1, got {every!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1 (steps per adapter turn), got {every}")
        self.every = int(every)
        self.order = _parse_order(order)
        self.rotation: list[int] = []

    def begin(
        self, adapters: list[str], weights: list[float], num_steps: int, context: StrategyContext | None = None
    ) -> None:
        super().begin(adapters, weights, num_steps, context)
        names = list(self.order or [])
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            valid = ", ".join(self.adapters) if self.adapters else "none (no LoRA in this generation)"
            raise SwitchOrderError(f"switch order: unknown adapter {', '.join(unknown)}; adapters: {valid}")
        names += [n for n in self.adapters if n not in names]
        self.rotation = [self.adapters.index(n) for n in names]

    def active(self, step: int) -> int | None:
        """Index (in the adapters' order) of the adapter active on ``step``; ``None`` without adapters."""
        if not self.rotation:
            return None
        return self.rotation[(step // self.every) % len(self.rotation)]

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        weights = torch.zeros(1, len(self.adapters))
        index = self.active(step)
        if index is not None:
            weights[0, index] = self.user_weights[index]
        return StepPlan(weights)

    def text_mask(self) -> torch.Tensor | None:
        """The prompt is encoded with the first adapter of the rotation only, as in the reference pipeline
        (its text-encoder LoRA is active when the prompt is encoded, before any switch)."""
        mask = torch.zeros(len(self.adapters))
        if self.rotation:
            mask[self.rotation[0]] = 1.0
        return mask
