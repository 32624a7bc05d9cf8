"""cmlora: Cached Multi-LoRA composition (Zou, Shen, Bouganis, Zhao, ICLR 2025, arXiv:2502.04923).

Every adapter runs alone in its own row group (LoRA Composite style: one noise prediction per
adapter), the predictions are averaged with one *dominant* adapter weighted above the others, the
dominant role rotates through the adapters in high-frequency-first order, and the non-dominant
adapters' predictions are recomputed only on the steps of a non-uniform caching schedule and reused
(``StepPlan.reuse``) in between. The driver batches the groups computed on a step into one pass.

Per denoiser call ``s`` of ``T``, with ``N`` adapters in order ``o_0..o_{N-1}``:

    k        = s // switch_every                         (number of switches so far)
    dominant = o_{k mod N}
    w_dom(k) = max(1, w_dom(0) - sum_{j=1..k} dom_decay**j)
    eps      = (w_dom(k) * eps_dominant + sum_{others} eps_i) / (w_dom(k) + N - 1)

so ``combine`` is ``w_dom / (w_dom + N - 1)`` for the dominant group and ``1 / (w_dom + N - 1)`` for
each other group (they sum to 1). Group ``g`` holds adapter ``o_g`` alone at its user (UNet) weight.

Hyperparameters, defaults and sources (reference code: repository ``Yqcca/CMLoRA``):

- order: adapters sorted by high-frequency score, highest first (paper Sec. 3-4, frequency-domain
  sequencing; the reference hard-codes the profiled order in ``callbacks_sa.check_anime_lora``:
  character/clothing/style/object LoRAs before background LoRAs). Scores come from, in turn:
  ``frequency_scores`` (``{name: score}``), else the frequency cache written by
  :func:`lora_composer.fusion.frequency.profile_adapters` (looked up by each adapter file's sha256 in
  ``frequency_cache`` or the default cache folder; no rendering happens during a generation). Adapters
  without a score keep their given relative order after the scored ones; with no scores at all the
  given order is used unchanged (``describe()["order_source"]`` says which applied).
- ``dom_weight=None`` -> ``w_dom(0) = N - 0.5``: ``dom_lora_coeff = len(adapters) - 0.5`` in
  ``LoRA_Cache/pipelines/stable_diffusion/pipeline_async.py`` (and ``pipeline_offline.py``), where the
  dominant prediction is scaled by ``N * w_dom / (w_dom + N - 1)``, the others by ``N / (w_dom + N - 1)``
  and the N predictions then averaged: the weights above.
- ``dom_decay=0.0``: the README's "decaying dominant weight scale" (``compose_async``):
  ``pipeline_async.py`` subtracts ``0.5 ** k`` from the coefficient at the k-th switch, but computes
  the weights once before the loop, so the images it produced use the constant ``w_dom(0)``. The
  default reproduces that; ``dom_decay=0.5`` applies the stated decay, floored at 1 so the dominant
  adapter never weighs less than the others (our guard: with N=2 the undamped series would reach 0.5).
- ``switch_every=None`` -> ``max(1, T // 10)``: ``pipeline_async.py`` switches at
  ``range(20, 201, 20)`` with the default 200 steps (``compose_async.py --denoise_steps 200``). The
  first dominant is the head of the order (highest frequency), as in ``pipeline_offline.py``, where the
  first switch happens at step 0; ``pipeline_async.py``'s ``(indicator - 1) % N`` starts from the last.
- ``cache=True`` with ``cache_intervals=(2, 3, 2)`` and ``cache_bounds=(0.375, 0.875)``: the
  non-uniform schedule of ``cache_interval == 0`` in ``pipeline_async.py``/``pipeline_offline.py``:
  refresh every 2 steps on ``[0, int(0.375 T))``, every 3 on ``[int(0.375 T), int(0.875 T))`` and every
  2 on ``[int(0.875 T), T)`` (denser where the paper finds features change fastest, early and late).
  A uniform interval ``c`` is ``cache_intervals=(c, c, c)``; ``cache=False`` recomputes every group on
  every step. Deviation: the reference caches DeepCache-style deep UNet features
  (``cache_layer_id=0, cache_block_id=1``, shallow layers still run); here a non-dominant adapter's
  whole prediction is reused, which is what the driver's row-group cache provides. The dominant
  adapter is recomputed on every step.
"""

from __future__ import annotations

import torch

from lora_composer.fusion.base import StepPlan, Strategy


class CMLoRAStrategy(Strategy):
    name = "cmlora"

    def __init__(
        self,
        frequency_scores: dict | None = None,
        switch_every: int | None = None,
        dom_weight: float | None = None,
        dom_decay: float = 0.0,
        cache: bool = True,
        cache_intervals=(2, 3, 2),
        cache_bounds=(0.375, 0.875),
        frequency_cache: str | None = None,
    ):
        if isinstance(cache_intervals, str):  # "2,3,2" from --strategy-arg
            cache_intervals = [c for c in cache_intervals.replace(" ", "").split(",") if c]
        if isinstance(cache_bounds, str):
            cache_bounds = [b for b in cache_bounds.replace(" ", "").split(",") if b]
        try:
            intervals = tuple(int(c) for c in cache_intervals)
            bounds = tuple(float(b) for b in cache_bounds)
        except (TypeError, ValueError):
            raise ValueError(
                f"cache_intervals/cache_bounds must be numbers such as 2,3,2 and 0.375,0.875, "
                f"got {cache_intervals!r} and {cache_bounds!r}"
            ) from None
        if len(intervals) != 3 or min(intervals) < 1:
            raise ValueError(f"cache_intervals must be three steps >= 1, got {cache_intervals!r}")
        if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
            raise ValueError(f"cache_bounds must be two fractions 0 <= a <= b <= 1, got {cache_bounds!r}")
        if switch_every is not None and int(switch_every) < 1:
            raise ValueError(f"switch_every must be >= 1, got {switch_every}")
        if dom_weight is not None and float(dom_weight) < 1.0:
            raise ValueError(f"dom_weight must be >= 1, got {dom_weight}")
        if not 0.0 <= float(dom_decay) < 1.0:
            raise ValueError(f"dom_decay must be in [0, 1), got {dom_decay}")
        if isinstance(frequency_scores, str):  # "ink:0.8,castle:0.2" from --strategy-arg
            frequency_scores = frequency_scores.split(",")
        if isinstance(frequency_scores, (list, tuple)):
            pairs = [str(item).rpartition(":") for item in frequency_scores if str(item).strip()]
            try:
                frequency_scores = {name.strip(): float(score) for name, _, score in pairs}
            except ValueError:
                raise ValueError(
                    f"frequency_scores must read name:score,name:score, got {frequency_scores!r}"
                ) from None
        self.frequency_scores = dict(frequency_scores) if frequency_scores else None
        self.switch_every_arg = None if switch_every is None else int(switch_every)
        self.dom_weight_arg = None if dom_weight is None else float(dom_weight)
        self.dom_decay = float(dom_decay)
        self.cache = bool(cache)
        self.cache_intervals = intervals
        self.cache_bounds = bounds
        self.frequency_cache = frequency_cache

    # -- set-up ------------------------------------------------------------------------------------
    def _scores(self) -> tuple[dict[str, float], str]:
        if self.frequency_scores is not None:
            return {n: float(s) for n, s in self.frequency_scores.items() if n in self.adapters}, "scores"
        adapters = [a for a in self.context.adapters if a.name in self.adapters]
        if adapters:
            from lora_composer.fusion.frequency import cached_scores

            found = cached_scores(adapters, self.frequency_cache)
            if found:
                return found, "profile cache"
        return {}, "given"

    def begin(self, adapters, weights, num_steps, context=None) -> None:
        super().begin(adapters, weights, num_steps, context)
        scores, source = self._scores()
        given = list(range(len(self.adapters)))
        scored = sorted((i for i in given if self.adapters[i] in scores), key=lambda i: -scores[self.adapters[i]])
        self.order = scored + [
            i for i in given if self.adapters[i] not in scores
        ]  # sorted() is stable: ties keep order
        self.order_source = source if scored else "given"
        self.scores = scores
        n = len(self.adapters)
        self.switch_every = self.switch_every_arg or max(1, self.num_steps // 10)
        self.dom_weight = self.dom_weight_arg if self.dom_weight_arg is not None else max(1.0, n - 0.5)
        t = self.num_steps
        self._edges = (0, int(self.cache_bounds[0] * t), int(self.cache_bounds[1] * t))

    # -- schedule ------------------------------------------------------------------------------------
    def dominant(self, step: int) -> int:
        """Group (position in ``order``) of the dominant adapter at call ``step``."""
        return (step // self.switch_every) % max(1, len(self.adapters))

    def dominant_weight(self, step: int) -> float:
        k = step // self.switch_every
        decay = sum(self.dom_decay**j for j in range(1, k + 1)) if self.dom_decay else 0.0
        return max(1.0, self.dom_weight - decay)

    def refresh(self, step: int) -> bool:
        """Whether the non-dominant adapters are recomputed at call ``step`` (always, without caching)."""
        if not self.cache:
            return True
        seg = 2 if step >= self._edges[2] else 1 if step >= self._edges[1] else 0
        return (step - self._edges[seg]) % self.cache_intervals[seg] == 0

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        n = len(self.adapters)
        if n == 0:
            return StepPlan(torch.zeros(1, 0))
        weights = torch.zeros(n, n)
        for g, i in enumerate(self.order):
            weights[g, i] = self.user_weights[i]
        dom, w = self.dominant(step), self.dominant_weight(step)
        combine = torch.full((n,), 1.0 / (w + n - 1), dtype=torch.float64)
        combine[dom] = w / (w + n - 1)
        reuse = None
        if self.cache and n > 1:
            reuse = torch.full((n,), not self.refresh(step), dtype=torch.bool)
            reuse[dom] = False
        return StepPlan(weights, combine=combine, reuse=reuse)

    def resolved(self) -> dict:
        """The order and switch interval this generation chose (frequency scores or the order given)."""
        out = {
            "order": [self.adapters[i] for i in getattr(self, "order", [])],
            "order_source": getattr(self, "order_source", "given"),
        }
        for name in ("switch_every", "dom_weight"):
            out[name] = getattr(self, name, getattr(self, f"{name}_arg"))
        return out
