"""klora: K-LoRA's layer-wise selection (Ouyang et al., CVPR 2025), generalised from two LoRAs to N.

K-LoRA fuses a subject LoRA and a style LoRA without training: in each layer it compares the sum of the
``top_k`` largest ``|dW|`` entries of the two deltas (after rescaling each by its average over the layers, so
a LoRA with larger weights overall does not win everywhere) and lets the larger one act there alone.

Here every LoRA competes in every layer it touches: its score is the sum of its ``top_k`` largest
``|w_i dW_i|`` entries divided by that LoRA's mean score over its layers, and the ``keep`` best-scoring LoRAs
of a layer act in it at their user weights, the others not. K-LoRA's timestep factor favours the style LoRA
early (``1.5 t / T + 0.5``); with N LoRAs there is no style side to favour, so the selection here is the same
at every step: a static per-layer assignment run as merge (one pass per step, fusable) through derived
adapters that keep only the layers each LoRA won. Layers only one LoRA touches keep it; SHiRA and
multiplicative layers (DoRA, IA3, OFT) always act.
"""

from __future__ import annotations

import dataclasses

import torch

from lora_composer.adapters.shira import dense_delta
from lora_composer.fusion.base import DerivedMerge
from lora_composer.fusion.task_arithmetic import readable


def top_sum(delta: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` largest ``|delta|`` entries (all of them when ``delta`` has fewer)."""
    flat = delta.abs().reshape(-1)
    return float(torch.topk(flat, min(int(k), flat.numel())).values.sum())


def layer_winners(adapters: list, weights: list[float], top_k: int, keep: int) -> dict[str, set[int]]:
    """``{layer: indices of the adapters that act there}`` for every layer more than one adapter touches."""
    scores: list[dict[str, float]] = []
    for ad, w in zip(adapters, weights):
        s = {k: top_sum(float(w) * dense_delta(d), top_k) for k, d in ad.deltas.items() if readable(d)}
        mean = sum(s.values()) / len(s) if s else 1.0
        scores.append({k: v / mean if mean > 0 else 0.0 for k, v in s.items()})
    winners = {}
    for key in {k for s in scores for k in s}:
        rivals = [(s[key], i) for i, s in enumerate(scores) if key in s]
        if len(rivals) > 1:
            winners[key] = {i for _, i in sorted(rivals, key=lambda r: (-r[0], r[1]))[:keep]}
    return winners


class KLoraStrategy(DerivedMerge):
    name = "klora"
    suffix = "~klora"

    def __init__(self, top_k: int = 64, keep: int = 1):
        if int(top_k) < 1 or int(keep) < 1:
            raise ValueError(f"top_k and keep must be >= 1, got top_k={top_k}, keep={keep}")
        self.top_k, self.keep = int(top_k), int(keep)

    def build_derived(self) -> dict | None:
        ads = self.source_adapters()
        if not ads:
            return None
        winners = layer_winners(ads, self.user_weights.tolist(), self.top_k, self.keep)
        return {
            ad.name: dataclasses.replace(
                ad,
                name=ad.name + self.suffix,
                deltas={k: d for k, d in ad.deltas.items() if k not in winners or i in winners[k]},
            )
            for i, ad in enumerate(ads)
        }
