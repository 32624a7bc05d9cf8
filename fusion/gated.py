"""gated: training-free fine-grained gated fusion, weights per layer group and per timestep.

After AutoLoRA's fine-grained gated fusion (Li et al. 2025, arXiv:2508.02107), which weighs several
LoRAs differently across network layers and diffusion timesteps. AutoLoRA learns its gate; here the gate
is read off the adapters themselves, once per generation, from how strongly each one reacts to the prompt:

1. **Response.** For layer group ``g`` (``lora_composer.runtime.layer_group``) and adapter ``i``, over the
   cross-attention key/value layers ``attn2.to_k``/``attn2.to_v`` of the group (those any of the adapters
   patch; an adapter without a delta there counts 0)::

       r[g, i] = mean over layers, tokens of  ||dW e|| / ||e||,     dW = alpha / rank * up @ down

   with ``e`` the prompt's token embeddings as the denoiser receives them (``encoder_hidden_states``,
   conditional half of the CFG batch). Those two layers are the only ones that read the prompt, so this
   is how much each adapter changes what the prompt contributes in that block. It costs two rank-``r``
   matmuls per layer, once. Groups without cross-attention (ResNet-only blocks) get the mean of the
   groups that have it; layers whose input width is not the embeddings' (an ``encoder_hid_proj`` in
   between) are skipped; an adapter with no key/value delta anywhere gets a neutral gate.
2. **Gates.** With ``per_adapter=True`` (default) each adapter's responses are first divided by their
   mean over groups: the gate follows *where* an adapter concentrates, not how loud it is overall, since
   its overall strength is the user's weight (``alpha`` or a strong training run would otherwise win every
   block). Then, per group, across the ``n`` adapters::

       gate[g, i] = n * softmax_i(log r[g, i] / temperature)     (mean 1 over the adapters of a group)

   ``temperature=1`` makes gates proportional to the responses, larger values flatten them,
   ``temperature=inf`` makes every gate 1 (exactly merge); smaller values sharpen towards one adapter
   per block.
3. **Timestep.** The gate acting at a step is ``1 + s(t) * (gate - 1)``, a blend between merge (1) and
   the full gate. ``s`` follows the noise level ``u = t / num_train_timesteps`` (1 at the start, 0 at the
   end; the step fraction when the timestep is unknown): ``schedule="early"`` (default) ``s = strength *
   u**power``, ``"late"`` ``s = strength * (1 - u)**power``, ``"constant"`` ``s = strength``. The default
   follows eDiff-I (Balaji et al. 2022, arXiv:2211.01324): early in sampling the image relies strongly on
   the text prompt, later the text conditioning is almost ignored. The gates are derived from the
   prompt's path, so they act in full where that path drives the image and fade to the user's plain
   weights where it no longer does; ``"late"`` gives the opposite reading (route fine detail, keep the
   layout a plain merge).
4. **Weights.** Adapter ``i`` gets ``user_weight[i] * gate`` in each layer group, so a gate of 1 is
   merge and the user's weights keep their meaning. The whole batch shares them (one row group).

Every step's gates are kept in ``trace`` (``[layer groups, adapters]``, order in ``layer_groups``) and, as
weights, in the driver's ``history`` (``plan.layer_weights``): a layer-group x adapter heatmap per step.
Text-encoder weights are not gated.
"""

from __future__ import annotations

import math

import torch

from lora_composer.adapters.kinds import has_factors
from lora_composer.vocab import CROSS_ATTENTION_KV as KV_SUFFIXES
from lora_composer.vocab import DENOISERS, layer_group
from lora_composer.fusion.base import StepPlan, Strategy

SCHEDULES = ("early", "late", "constant")
_FLOOR = 1e-6  # responses below this (relative) count as "no reaction" rather than log(0)


def layer_response(down: torch.Tensor, up: torch.Tensor, scale: float, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||scale * up @ down @ e|| / ||e||`` for ``embeddings [..., tokens, in]``."""
    e = embeddings.reshape(-1, embeddings.shape[-1]).float()
    down = down.to(e.device, torch.float32)
    up = up.to(e.device, torch.float32)
    out = (e @ down.T) @ up.T * float(scale)
    return (out.norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-12)).mean()


def prompt_responses(adapters, groups: list[str], embeddings: torch.Tensor) -> torch.Tensor:
    """``r[g, i]`` (see the module doc) for ``adapters`` (each with ``deltas``) over layer ``groups``."""
    width = embeddings.shape[-1]
    keys = {
        key
        for ad in adapters
        for key, d in ad.deltas.items()
        if key.split(".", 1)[0] in DENOISERS and key.endswith(KV_SUFFIXES) and has_factors(d) and d.down.dim() == 2
        and d.down.shape[1] == width
    }
    by_group: dict[str, list[str]] = {}
    for key in sorted(keys):
        by_group.setdefault(layer_group(key), []).append(key)
    r = torch.zeros(len(groups), len(adapters))
    has = torch.zeros(len(groups), dtype=torch.bool)
    for g, group in enumerate(groups):
        layer_keys = by_group.get(group, [])
        if not layer_keys:
            continue
        has[g] = True
        for i, ad in enumerate(adapters):
            total = sum(
                float(layer_response(d.down, d.up, d.scale, embeddings))
                for d in (ad.deltas.get(k) for k in layer_keys)
                if d is not None and has_factors(d)
            )
            r[g, i] = total / len(layer_keys)
    if has.any():
        r[~has] = r[has].mean(dim=0)
    return r


def gates_from_responses(responses: torch.Tensor, temperature: float = 1.0, per_adapter: bool = True) -> torch.Tensor:
    """``[groups, adapters]`` responses -> gates with mean 1 over the adapters of each group."""
    groups, n = responses.shape
    if math.isinf(temperature) or n == 0:
        return torch.ones(groups, n)
    r = responses.double()
    if per_adapter:
        mean = r.mean(dim=0, keepdim=True)
        r = torch.where(mean > 0, r / mean.clamp_min(1e-300), torch.ones_like(r))  # no reaction at all: neutral
    else:
        top = r.max()
        r = r / top if top > 0 else torch.ones_like(r)
    logits = r.clamp_min(_FLOOR).log() / temperature
    return (n * torch.softmax(logits, dim=1)).float()


class GatedStrategy(Strategy):
    """Per layer group, per timestep adapter weights from each adapter's response to the prompt.

    - ``temperature`` (1.0): softness of the gates across adapters; 1 = proportional to the responses,
      ``inf`` = all gates 1 (merge).
    - ``strength`` (1.0, in [0, 1]): how far the gates move from merge at the schedule's peak.
    - ``schedule`` ("early"): when the gates act, ``early`` (full at high noise, merge at the end),
      ``late`` (the reverse) or ``constant``.
    - ``power`` (1.0): shape of the schedule's ramp (1 linear, larger = the gates act over a shorter span).
    - ``per_adapter`` (True): compare where adapters react rather than how loud they are.
    """

    name = "gated"
    measured = 'close to merge: ahead at 2 LoRAs (0.83 vs 0.80), behind at 4 (0.26 vs 0.34)'

    def __init__(
        self,
        temperature: float = 1.0,
        strength: float = 1.0,
        schedule: str = "early",
        power: float = 1.0,
        per_adapter: bool = True,
    ):
        self.temperature = float(temperature)
        self.strength = float(strength)
        self.schedule = str(schedule)
        self.power = float(power)
        self.per_adapter = bool(per_adapter)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (inf for merge), got {temperature}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not self.power >= 0:
            raise ValueError(f"power must be >= 0, got {power}")
        self.layer_groups: list[str] = []
        self.responses: torch.Tensor | None = None
        self.gates: torch.Tensor | None = None
        self.trace: list[torch.Tensor] = []

    def begin(self, adapters, weights, num_steps, context=None) -> None:
        super().begin(adapters, weights, num_steps, context)
        self.responses = None
        self.gates = None
        self.trace = []
        self.layer_groups = list(self.context.layer_groups)
        self.train_timesteps = int(self.context.num_train_timesteps or 1000)

    def _adapter_objects(self) -> list:
        try:
            return [self.context.adapter(name) for name in self.adapters]
        except KeyError:  # a hand-built context without the Adapter objects: neutral gates
            return []

    def _conditional(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The conditional half of a CFG batch (diffusers concatenates [negative, positive])."""
        cfg = self.context.cfg
        if cfg is None:  # unknown: an even batch of more than one row is taken for [negative, positive]
            cfg = embeddings.shape[0] % 2 == 0 and embeddings.shape[0] > 1
        if cfg and embeddings.shape[0] > 1:
            return embeddings[embeddings.shape[0] // 2 :]
        return embeddings

    def observe(self, step: int, timestep: float | None, inputs: dict) -> None:
        if self.responses is not None:
            return
        embeddings = inputs.get("encoder_hidden_states")
        adapters = self._adapter_objects() if self.adapters else []
        if not self.layer_groups:  # no runtime given: the layer groups the adapters patch
            self.layer_groups = list(
                dict.fromkeys(layer_group(k) for ad in adapters for k in ad.deltas if k.split(".", 1)[0] in DENOISERS)
            )
        if isinstance(embeddings, torch.Tensor) and embeddings.dim() >= 2 and adapters:
            with torch.no_grad():
                self.responses = prompt_responses(adapters, self.layer_groups, self._conditional(embeddings.detach()))
        else:  # nothing to react to: neutral gates
            self.responses = torch.ones(len(self.layer_groups), len(self.adapters))
        self.gates = gates_from_responses(self.responses, self.temperature, self.per_adapter)

    def blend(self, step: int, timestep: float | None) -> float:
        """``s(t)``: 0 = merge, 1 = the full gates."""
        if self.schedule == "constant":
            return self.strength
        if timestep is not None:
            u = min(max(float(timestep) / self.train_timesteps, 0.0), 1.0)
        else:
            u = 1.0 - step / max(self.num_steps - 1, 1)
            u = min(max(u, 0.0), 1.0)
        x = u if self.schedule == "early" else 1.0 - u
        return self.strength * x**self.power

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        weights = self.user_weights.unsqueeze(0)
        if self.gates is None:  # plan without observe (a driver that gives no inputs): merge
            self.observe(step, timestep, {})
        s = self.blend(step, timestep)
        gates = torch.ones_like(self.gates) if s == 0.0 else 1.0 + s * (self.gates - 1.0)
        self.trace.append(gates)
        layer_weights = {g: (self.user_weights * gates[k]).unsqueeze(0) for k, g in enumerate(self.layer_groups)}
        return StepPlan(weights, layer_weights=layer_weights or None)

    def describe(self) -> dict:
        temperature = "inf" if math.isinf(self.temperature) else self.temperature
        return {
            "temperature": temperature,
            "strength": self.strength,
            "schedule": self.schedule,
            "power": self.power,
            "per_adapter": self.per_adapter,
        }
