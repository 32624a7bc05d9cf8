"""Drive the denoiser from a strategy without touching the diffusers pipeline's code.

Instead of swapping ``pipe.unet`` for a proxy object (which breaks attribute access such as
``pipe.unet.config``, ``save_pretrained`` and offloading), the denoiser's ``forward`` is overridden on
the instance for the length of one generation (the way accelerate's hooks do it) and restored after.
For each call the driver asks the strategy for a :class:`~lora_composer.fusion.base.StepPlan`, writes the mixing
tensor, runs the row groups that need computing (batched, in chunks under ``max_batch`` rows), reuses
cached predictions for the others, and combines them into the prediction the pipeline expects.
"""

from __future__ import annotations

import torch

from lora_composer.fusion.base import StepPlan, Strategy


def _repeat(value, batch: int, groups: int):
    """Repeat every tensor whose leading dimension is the batch, through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value] * groups, dim=0)
    if isinstance(value, dict):
        return {k: _repeat(v, batch, groups) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_repeat(v, batch, groups) for v in value)
    return value


def _timestep(args, kwargs) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return None if t is None else float(t)


def _sample_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


class DenoiserDriver:
    """Context manager: while active, every denoiser call follows ``strategy``.

    ``history`` keeps each call's plan (weights actually applied, per row group and layer group);
    ``calls`` counts the denoiser passes actually run and ``rows`` the batch rows they carried.
    """

    def __init__(
        self, runtime, denoiser: torch.nn.Module, strategy: Strategy, adapters: list[str], max_batch: int | None = None
    ):
        self.runtime = runtime
        self.denoiser = denoiser
        self.strategy = strategy
        self.adapters = list(adapters)
        self.max_batch = max_batch
        self.step = 0
        self.history: list[StepPlan] = []
        self.calls = 0
        self.rows = 0
        self._cache: dict[int, torch.Tensor] = {}
        self._saved = None
        self._last_output = None

    def _slot_rows(self, weights: torch.Tensor) -> torch.Tensor:
        """``[groups, adapters]`` in strategy order -> ``[groups, slots]`` (other slots at 0)."""
        rows = torch.zeros(weights.shape[0], self.runtime.denoiser_mix.slots)
        for i, name in enumerate(self.adapters):
            rows[:, self.runtime.slots[name]] = weights[:, i]
        return rows

    def _run(self, plan: StepPlan, groups: list[int], args, kwargs, batch: int):
        """One denoiser pass over ``groups`` (row groups of one batch); returns (output, per-group samples)."""
        def rows_of(w):
            return self._slot_rows(w[groups]).repeat_interleave(batch, dim=0)

        layer_rows = {g: rows_of(w) for g, w in (plan.layer_weights or {}).items()}
        self.runtime.set_denoiser_rows(rows_of(plan.weights), layer_rows or None)
        if len(groups) > 1:
            args, kwargs = _repeat(tuple(args), batch, len(groups)), _repeat(kwargs, batch, len(groups))
        output = self._last_output = self._forward(*args, **kwargs)
        self.calls += 1
        self.rows += batch * len(groups)
        return output, _sample_of(output).split(batch, dim=0)

    def __call__(self, *args, **kwargs):
        timestep = _timestep(args, kwargs)
        names = ("sample", "timestep", "encoder_hidden_states")
        inputs = {**dict(zip(names, args)), **kwargs}
        self.strategy.observe(self.step, timestep, inputs)
        plan = self.strategy.plan(self.step, timestep)
        if plan.groups == 0:  # no adapters at all: the base model
            plan = StepPlan(torch.zeros(1, len(self.adapters)))
        self.history.append(plan)
        self.step += 1
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        batch = sample.shape[0]
        if plan.groups == 1 and plan.reuse is None:
            return self._run(plan, [0], args, kwargs, batch)[0]

        if len(self._cache) and max(self._cache) >= plan.groups:
            self._cache.clear()
        reuse = plan.reuse if plan.reuse is not None else torch.zeros(plan.groups, dtype=torch.bool)
        todo = [g for g in range(plan.groups) if not (bool(reuse[g]) and g in self._cache)]
        per_pass = max(1, (self.max_batch or batch * plan.groups) // batch)
        output = None
        for start in range(0, len(todo), per_pass):
            chunk = todo[start : start + per_pass]
            output, samples = self._run(plan, chunk, args, kwargs, batch)
            self._cache.update(zip(chunk, samples))
        if output is None:  # every group reused: no pass this step, same output type as the last one
            output = self._last_output
        combine = plan.combine if plan.combine is not None else torch.full((plan.groups,), 1.0 / plan.groups)
        mixed = sum(float(combine[g]) * self._cache[g] for g in range(plan.groups))
        return _with_sample(output, mixed.to(sample.dtype))

    def __enter__(self):
        self._saved = self.denoiser.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's)
        self._forward = self.denoiser.forward
        self.denoiser.forward = self
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self.denoiser.forward = self._saved
        else:
            del self.denoiser.forward
        self._cache.clear()
        return False
