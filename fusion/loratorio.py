"""loratorio: per latent patch, weight each LoRA by how far its prediction departs from the base model's.

LoRAtorio (Foteinopoulou, Budvytis, Liwicki 2025, "LoRAtorio: An intrinsic approach to LoRA Skill
Composition", arXiv 2508.11624; no code released, implemented here from the paper's description). Its two
observations: a LoRA's prediction departs from the base model's where it renders its own concept, and stays
close to it where the prompt or the region is outside its domain. So, per denoising step:

1. run the denoiser with each LoRA alone and with the base model (``N + 1`` row groups, one batched pass);
2. split the latent into ``patch_size x patch_size`` patches; per patch, the cosine similarity ``s_i`` of
   LoRA ``i``'s conditional prediction to the base's conditional prediction (over channels and pixels);
3. a SoftMin over the LoRAs, ``m_i = softmax_i(-s_i / temperature)``, is a spatial weight map: in each
   patch the LoRA that departs most from the base wins;
4. conditional prediction ``c = sum_i m_i c_i`` (the map upsampled to the latent's pixels);
5. unconditional prediction re-centred on the base: ``u = 0.5 u_base + 0.5 sum_i m_i u_i``;
6. the dynamic variant keeps, per step and image, only the ``top_k`` LoRAs whose conditional predictions
   depart most from the base's (mean ``1 - s_i`` over patches); the others get weight 0 in that step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lora_composer.fusion.base import StepPlan, Strategy


def patch_cosine(preds: torch.Tensor, base: torch.Tensor, patch_size: int, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity per ``patch_size`` patch of each prediction to the base's.

    ``preds``: ``[N, B, C, H, W]``, ``base``: ``[B, C, H, W]`` -> ``[N, B, ceil(H / p), ceil(W / p)]`` (edge
    patches are smaller when ``p`` does not divide the size). Predictions of another shape (a DiT's
    ``[B, tokens, C]``) are compared whole: ``[N, B, 1, 1]``.
    """
    preds, base = preds.float(), base.float()
    if preds.dim() != 5:
        flat = preds.flatten(2)
        ref = base.flatten(1).unsqueeze(0)
        cos = (flat * ref).sum(-1) / ((flat.square().sum(-1) * ref.square().sum(-1)).sqrt() + eps)
        return cos[..., None, None]
    n, b = preds.shape[:2]
    p = max(1, int(patch_size))

    def pool(x):  # [N, B, H, W] -> per-patch means (an edge patch's divisor is shared: the ratio cancels it)
        return F.avg_pool2d(x.flatten(0, 1).unsqueeze(1), p, stride=p, ceil_mode=True).squeeze(1).unflatten(0, (n, b))

    ref = base.unsqueeze(0).expand_as(preds)
    dot = pool((preds * ref).sum(2))
    norms = pool(preds.square().sum(2)) * pool(ref.square().sum(2))
    return dot / (norms.sqrt() + eps)


def softmin_map(cos: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """``[N, B, h, w]`` similarities -> weights over the ``N`` LoRAs per patch (summing to 1).

    ``top_k``: per image, only the ``k`` LoRAs with the largest mean divergence ``1 - cos`` take part.
    """
    logits = -cos / float(temperature)
    n = cos.shape[0]
    if top_k is not None and 0 < int(top_k) < n:
        divergence = (1.0 - cos).mean(dim=(-2, -1))  # [N, B]
        keep = torch.zeros_like(divergence, dtype=torch.bool)
        keep.scatter_(0, divergence.topk(int(top_k), dim=0).indices, True)
        logits = logits.masked_fill(~keep[..., None, None], -math.inf)
    return torch.softmax(logits, dim=0)


def upsample_map(weights: torch.Tensor, patch_size: int, shape) -> torch.Tensor:
    """``[N, B, h, w]`` patch weights -> ``[N, B, 1, H, W]`` per latent pixel (``shape``: ``[B, C, H, W]``)."""
    p = max(1, int(patch_size))
    h, w = shape[-2], shape[-1]
    full = weights.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)[..., :h, :w]
    return full.unsqueeze(2)


def loratorio_combine(
    preds: torch.Tensor,
    base: torch.Tensor,
    cfg: bool,
    patch_size: int = 2,
    temperature: float = 0.1,
    top_k: int | None = None,
    uncond: str = "map",
    base_uncond: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAtorio's prediction from the LoRAs' (``[N, batch, ...]``) and the base's (``[batch, ...]``).

    With ``cfg`` the batch is ``[unconditional; conditional]`` halves: the map is computed on the
    conditional half and also weights the unconditional half (``uncond="map"``) or the LoRAs'
    unconditional predictions are averaged (``"mean"``), then ``u = base_uncond * u_base + (1 - base_uncond)
    * u_loras``. Without ``cfg`` every row is conditional. Returns (prediction ``[batch, ...]``, map
    ``[N, conditional rows, h, w]``).
    """
    out_dtype = preds.dtype
    preds, base = preds.float(), base.float()
    half = preds.shape[1] // 2 if cfg else 0
    cond, base_c = preds[:, half:], base[half:]
    cos = patch_cosine(cond, base_c, patch_size)
    weights = softmin_map(cos, temperature, top_k)
    spatial = cond.dim() == 5

    def apply(m, x):  # weighted sum over LoRAs
        if spatial:
            m = upsample_map(m, patch_size, x.shape[1:])
        else:
            m = m.reshape(*m.shape[:2], *([1] * (x.dim() - 2)))
        return (m * x).sum(0)

    out_c = apply(weights, cond)
    if not cfg:
        return out_c.to(out_dtype), weights
    lora_u = preds[:, :half]
    if uncond == "map":
        agg_u = apply(weights, lora_u)
    elif uncond == "mean":
        agg_u = lora_u.mean(0)
    else:
        raise ValueError(f"uncond must be 'map' or 'mean', got {uncond!r}")
    out_u = base_uncond * base[:half] + (1.0 - base_uncond) * agg_u
    return torch.cat([out_u, out_c]).to(out_dtype), weights


class LoRAtorioStrategy(Strategy):
    """LoRAtorio: per latent patch, a SoftMin over the LoRAs' cosine similarity to the base model's
    prediction weights their conditional predictions; the unconditional one is re-centred on the base's.

    Each step plans ``N + 1`` row groups (LoRA ``i`` alone at its user weight; the last group: the base,
    every adapter at 0) and combines them in :meth:`combine` with :func:`loratorio_combine` (module doc).
    With one LoRA the map is 1 everywhere: the conditional prediction is that LoRA's, the unconditional one
    half the base's.

    The unconditional half is aggregated with the same map as the conditional half (``uncond="map"``, the
    default): in each patch the guidance direction is then the winning LoRA's own ``c_i - u_i`` (plus the
    base's pull), rather than a mix of LoRAs that do not act there; ``uncond="mean"`` averages the LoRAs'
    unconditional predictions. Without classifier-free guidance (``context.cfg`` false or unknown) every row
    is conditional and nothing is re-centred.

    Parameters: ``patch_size`` (latent pixels per patch side), ``temperature`` (of the SoftMin: small -> one
    LoRA per patch, large -> the mean), ``top_k`` (the dynamic variant; ``None``: every LoRA),
    ``uncond`` (``"map"`` or ``"mean"``), ``base_uncond`` (the base's share of the unconditional prediction,
    0.5 in the paper). ``history`` of the driver keeps the plans; the last step's map is ``last_map``.

    Cost: ``N + 1`` times merge's denoiser rows per step (``top_k`` needs every prediction to rank them,
    so it saves nothing).

    When to choose it (measured on the mini world, ``docs/EVAL.md``): it picks one LoRA per
    patch, so it suits LoRAs that draw different regions (a background, an object); concepts that must all
    land on the same pixels (a shape, its colour, a style) compete there instead of adding up, and merge
    rendered them better on that world (see ``docs/EVAL.md``).
    """

    name = "loratorio"

    def __init__(
        self,
        patch_size: int = 2,
        temperature: float = 0.1,
        top_k: int | None = None,
        uncond: str = "map",
        base_uncond: float = 0.5,
    ):
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if float(temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1 or none, got {top_k}")
        if uncond not in ("map", "mean"):
            raise ValueError(f"uncond must be 'map' or 'mean', got {uncond!r}")
        self.patch_size, self.temperature = int(patch_size), float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.uncond, self.base_uncond = uncond, float(base_uncond)
        self.last_map: torch.Tensor | None = None

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        n = len(self.adapters)
        if not n:
            return StepPlan(torch.zeros(1, 0))  # nothing to compose: the base model, one group
        return StepPlan(torch.cat([torch.diag(self.user_weights), torch.zeros(1, n)]))

    def combine(self, predictions: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        if plan.row_groups != len(self.adapters) + 1:  # not our plan (no adapters): the linear default
            return super().combine(predictions, plan)
        mixed, self.last_map = loratorio_combine(
            predictions[:-1],
            predictions[-1],
            bool(self.context.cfg),
            self.patch_size,
            self.temperature,
            self.top_k,
            self.uncond,
            self.base_uncond,
        )
        return mixed
