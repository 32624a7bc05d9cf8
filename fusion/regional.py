"""regional: each region of the picture gets its own prompt and its own LoRAs (Regional Prompter's latent mode).

A prompt such as ``"on a striped background ADDCOMM blinky, a red circle <lora:blinky> BREAK a blue star
<lora:star>"`` splits the picture into columns (or rows), one per ``BREAK``-separated part, in reading order.
Each region is one row group: its rows see the region's prompt (the common text before ``ADDCOMM`` first),
encoded with only its LoRAs' text-encoder layers, and only its LoRAs (and those named in the common text or
passed outside the prompt) act in the denoiser. Per step the groups' predictions are combined by the regions'
masks, guidance's two halves alike:

    e = sum_r mask_r * e_r      (mask_r: 1 inside region r, 0 elsewhere)

Every group still sees the whole latent, so the picture stays one picture (shared background, no seams the
denoiser cannot see), while a concept asked of one object cannot act on the other: the remedy for *bleeding*
between subjects, the multi-subject failure no single-prompt strategy can avoid. The Regional Prompter
extension for AUTOMATIC1111 (hako-mikan/sd-webui-regional-prompter) and ComfyUI's masked conditioning work
this way (``attention="shared"``); here the LoRAs are routed per region as well.

Self-attention still mixes the regions: a model that learned one colour per picture pulls both objects to one
blended colour (on the mini world a purple object beside a red one comes out brown-green). ``attention="bounded"``
(the default) keeps each region's self-attention to its own tokens, as Bounded Attention (Dahary et al., ECCV
2024) does for subjects; convolutions still cross the border, so the background stays continuous.
"""

from __future__ import annotations

import contextlib
import math

import torch

from lora_composer.fusion.base import StepPlan, Strategy


def region_masks(height: int, width: int, ratios: list[float], split: str = "cols") -> torch.Tensor:
    """``[regions, height, width]`` hard masks (one 1 per pixel): bands across the width (``cols``) or the
    height (``rows``) in proportion to ``ratios``, the first on the left / top."""
    size = width if split == "cols" else height
    total = float(sum(ratios))
    edges = [round(size * sum(ratios[:i]) / total) for i in range(len(ratios) + 1)]
    masks = torch.zeros(len(ratios), height, width)
    for r, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        if split == "cols":
            masks[r, :, lo:hi] = 1.0
        else:
            masks[r, lo:hi, :] = 1.0
    return masks


def level_size(height: int, width: int, tokens: int) -> tuple[int, int] | None:
    """The ``(h, w)`` of a UNet level with ``tokens`` positions under a ``height x width`` latent (each level
    halves the sides, rounding up), or None when no level has that many."""
    for k in range(8):
        h, w = math.ceil(height / 2**k), math.ceil(width / 2**k)
        if h * w == tokens:
            return h, w
    return None


@contextlib.contextmanager
def bounded_self_attention(denoiser: torch.nn.Module, groups_of):
    """Every self-attention layer (``attn1``) attends within token groups only: ``groups_of(tokens)`` gives the
    index tensors of a call's groups (None: attend as usual). The layer runs once per group on that group's
    tokens, which is block-diagonal attention without a ``tokens x tokens`` mask. Instance ``forward``
    attributes are restored exactly on exit."""
    patched = []

    def bounded(forward):
        def call(hidden_states, *args, **kwargs):
            groups = None
            if (
                hidden_states.dim() == 3
                and not args
                and kwargs.get("encoder_hidden_states") is None
                and kwargs.get("attention_mask") is None
            ):
                groups = groups_of(hidden_states.shape[1])
            if groups is None:
                return forward(hidden_states, *args, **kwargs)
            out = torch.empty_like(hidden_states)
            for idx in groups:
                out[:, idx] = forward(hidden_states[:, idx], *args, **kwargs)
            return out

        return call

    try:
        for name, module in denoiser.named_modules():
            if name.endswith("attn1"):
                patched.append((module, module.__dict__.get("forward")))
                module.forward = bounded(module.forward)
        yield
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own


class RegionalStrategy(Strategy):
    """One row group per region, combined by the regions' masks.

    Cost: one row group per region (two regions: twice merge's denoiser rows). The prompt must have at least
    one ``BREAK``; without ``ratios`` the regions are equal bands. Parameters: ``split`` (``cols``: regions
    side by side, default; ``rows``: stacked), ``ratios`` (e.g. ``"2,1"``) and ``attention`` (``bounded``,
    default, or ``shared``). UNet pipelines (SD 1.x/2.x, SDXL).

    When to choose it: two or more subjects, each with its own LoRAs or attributes, in a layout you can give as
    bands. Measured on the two-object world (``docs/EVAL.md``) it is the only strategy that keeps each object's
    concepts on it; within one object it composes like merge (two LoRAs on one object still lose one as often).
    """

    name = "regional"
    regional = True

    def __init__(self, split: str = "cols", ratios: str | float | None = None, attention: str = "bounded"):
        if split not in ("cols", "rows"):
            raise ValueError(f"split must be 'cols' or 'rows', got {split!r}")
        if attention not in ("shared", "bounded"):
            raise ValueError(f"attention must be 'shared' or 'bounded', got {attention!r}")
        self.split, self.attention = split, attention
        if isinstance(ratios, (list, tuple)):  # --strategy-arg ratios=2,1 arrives as (2, 1)
            ratios = ",".join(str(r) for r in ratios)
        self.ratios = None if ratios is None else [float(r) for r in str(ratios).split(",")]
        if self.ratios is not None and (not self.ratios or min(self.ratios) <= 0):
            raise ValueError(f"ratios must be positive numbers such as '2,1', got {ratios!r}")

    def begin(self, adapters, weights, num_steps, context=None):
        super().begin(adapters, weights, num_steps, context)
        regions = self.context.regions
        if len(regions) < 2:
            raise ValueError(
                "needs a prompt split into regions with BREAK, e.g. "
                "'a red circle BREAK a blue square' (regions left to right)"
            )
        if self.ratios is not None and len(self.ratios) != len(regions):
            raise ValueError(f"ratios give {len(self.ratios)} regions, the prompt has {len(regions)}")
        self.weights = torch.zeros(len(regions), len(self.adapters))
        for r, region in enumerate(regions):
            for i, name in enumerate(self.adapters):
                self.weights[r, i] = float(region.adapters.get(name, 0.0))
        self._inputs: list[dict] | None = None
        self._rows: dict[tuple, list[dict]] = {}  # per batch layout: each region's embeddings as the call's rows
        self._latent: tuple[int, int] | None = None
        self._groups: dict[int, list[torch.Tensor] | None] = {}
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def observe(self, step, timestep, inputs):
        """Each region's embeddings in the place of the prompt's, for as many images as the call has."""
        hidden = inputs.get("encoder_hidden_states")
        if hidden is None:
            raise ValueError("the denoiser call has no encoder_hidden_states to give each region its prompt")
        sample = next((inputs[k] for k in ("sample", "hidden_states") if k in inputs), None)
        if sample is not None and sample.dim() == 4 and tuple(sample.shape[-2:]) != self._latent:
            self._latent, self._groups = tuple(sample.shape[-2:]), {}
        key = (hidden.shape[0], hidden.dtype, hidden.device)
        if key not in self._rows:  # built once per generation (the batch layout does not change between steps)
            self._rows[key] = [self._region_rows(region.embeds, hidden) for region in self.context.regions]
        added = inputs.get("added_cond_kwargs")
        self._inputs = []
        for r in self._rows[key]:
            own = {"encoder_hidden_states": r["encoder_hidden_states"]}
            if "text_embeds" in r and added is not None:  # SDXL: the pooled prompt is the region's too
                own["added_cond_kwargs"] = {**added, "text_embeds": r["text_embeds"]}
            self._inputs.append(own)

    def _region_rows(self, embeds: dict, hidden: torch.Tensor) -> dict:
        """One region's embeddings as the call's rows: ``[negative x images, positive x images]`` under guidance."""
        halves = 2 if self.context.cfg else 1
        images = hidden.shape[0] // halves

        def rows(positive, negative):
            parts = [negative, positive] if halves == 2 else [positive]
            return torch.cat([p.expand(images, *p.shape[1:]) for p in parts], dim=0).to(hidden.device, hidden.dtype)

        out = {"encoder_hidden_states": rows(embeds["positive"], embeds["negative"])}
        if "pooled_positive" in embeds:
            out["text_embeds"] = rows(embeds["pooled_positive"], embeds["pooled_negative"])
        return out

    def plan(self, step, timestep):
        return StepPlan(self.weights.clone(), inputs=self._inputs)

    def _token_groups(self, tokens: int) -> list[torch.Tensor] | None:
        """Each region's token indices at the UNet level with ``tokens`` positions (row-major, as the
        transformer blocks flatten them)."""
        if tokens not in self._groups:
            size = level_size(*self._latent, tokens) if self._latent else None
            groups = None
            if size is not None:
                masks = region_masks(*size, self.ratios or [1.0] * len(self.context.regions), self.split)
                groups = [torch.nonzero(m.flatten()).flatten() for m in masks]
                groups = [g for g in groups if len(g)] or None
            self._groups[tokens] = groups
        return self._groups[tokens]

    def patched(self, denoiser):
        """``attention="bounded"``: self-attention stays within each region (cross-region leakage cut)."""
        if self.attention != "bounded":
            return contextlib.nullcontext()
        return bounded_self_attention(denoiser, self._token_groups)

    def combine(self, predictions, plan):
        """``sum_r mask_r * e_r`` with masks at the prediction's height and width (every row alike)."""
        h, w = predictions.shape[-2:]
        if (h, w) not in self._masks:
            ratios = self.ratios or [1.0] * plan.row_groups
            self._masks[h, w] = region_masks(h, w, ratios, self.split).to(predictions)[:, None, None]
        return (predictions * self._masks[h, w]).sum(0)

    def resolved(self) -> dict:
        """Each region's text and LoRAs, as the prompt split them."""
        return {
            "regions": [
                {"prompt": r.prompt, "loras": r.adapters}
                for r in getattr(getattr(self, "context", None), "regions", [])
            ]
        }
