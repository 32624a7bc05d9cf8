"""Drive the denoiser from a strategy without touching the diffusers pipeline's code.

Instead of swapping ``pipe.unet`` for a proxy object (which breaks attribute access such as
``pipe.unet.config``, ``save_pretrained`` and offloading), a forward pre-hook and a forward hook are
installed on the denoiser for the length of one generation. Before each call the pre-hook asks the
strategy for that step's weights; when the strategy wants several row groups it repeats the batch
and routes each group through its own row of the mixing tensor; the post-hook averages the groups'
predictions back to the pipeline's batch.
"""

from __future__ import annotations

import torch

from fusion.base import Strategy


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


class DenoiserDriver:
    """Context manager: while active, every denoiser call follows ``strategy``.

    ``history`` keeps the weights applied at each call (``[groups, adapters]``), for explanations.
    """

    def __init__(self, runtime, denoiser: torch.nn.Module, strategy: Strategy, adapters: list[str]):
        self.runtime = runtime
        self.denoiser = denoiser
        self.strategy = strategy
        self.adapters = list(adapters)
        self.step = 0
        self.history: list[torch.Tensor] = []
        self._groups = 1
        self._batch = 0
        self._handles = []

    def _slot_rows(self, weights: torch.Tensor) -> torch.Tensor:
        """``[groups, adapters]`` in strategy order -> ``[groups, slots]`` (other slots at 0)."""
        rows = torch.zeros(weights.shape[0], self.runtime.denoiser_mix.slots)
        for i, name in enumerate(self.adapters):
            rows[:, self.runtime.slots[name]] = weights[:, i]
        return rows

    def _pre(self, module, args, kwargs):
        plan = self.strategy.plan(self.step, _timestep(args, kwargs))
        self.history.append(plan.weights.detach().clone())
        rows = self._slot_rows(plan.weights)
        self._groups = plan.groups
        if plan.groups == 1:
            self.runtime.set_denoiser_rows(rows)
            return None
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        self._batch = batch = sample.shape[0]
        self.runtime.set_denoiser_rows(rows.repeat_interleave(batch, dim=0))
        return _repeat(tuple(args), batch, plan.groups), _repeat(kwargs, batch, plan.groups)

    def _post(self, module, args, kwargs, output):
        self.step += 1
        if self._groups == 1:
            return None

        def mean(x: torch.Tensor) -> torch.Tensor:
            return x.view(self._groups, self._batch, *x.shape[1:]).mean(dim=0)

        if isinstance(output, tuple):
            return (mean(output[0]), *output[1:])
        output.sample = mean(output.sample)
        return output

    def __enter__(self):
        self._handles = [
            self.denoiser.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.denoiser.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False
