"""Drive the denoiser from a strategy without touching the diffusers pipeline's code.

Instead of swapping ``pipe.unet`` for a proxy object (which breaks attribute access such as
``pipe.unet.config``, ``save_pretrained`` and offloading), the driver registers a diffusers model hook
(:mod:`diffusers.hooks`) on the denoiser for the length of one generation and removes it after. Being one
more hook in diffusers' own chain, it composes with group offloading and cache hooks registered before
it: each of its passes runs through them. For each call the driver asks the strategy for a
:class:`~lora_composer.fusion.base.StepPlan`, writes the mixing tensor, runs the row groups that need
computing (batched, in chunks under ``max_batch`` rows, each group with its own inputs where the plan gives
them), reuses cached predictions for the others, and
combines them into the prediction the pipeline expects (``strategy.combine``: the plan's linear ``combine``
weights unless the strategy combines otherwise).

The sample and the timestep are found through the denoiser class's ``forward`` signature (``sample``
for a UNet, ``hidden_states`` for a DiT; positional or keyword), so any calling convention works. When
row groups replicate the batch, every input whose leading dimension is the batch is repeated (FLUX's
``guidance``, ``pooled_projections``, tensors inside ``joint_attention_kwargs``...) except FLUX's
position ids (``img_ids``, ``txt_ids``: one per token, shared by the batch, whatever their length).

Cache hooks (e.g. ``apply_first_block_cache``) keep their state per cache context (``"cond"``...). With
several row groups, each pass runs under a context of its own, named after the pipeline's and the
row groups it carries: a cache then only ever compares a pass with the previous pass of the same row
groups (same adapters, same batch size), never one adapter's rows with another's. The cache decides
for a pass as a whole (as it does for a CFG batch), not per row group.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from lora_composer.fusion.base import StepPlan, Strategy

HOOK_NAME = "lora_composer_driver"
_SAMPLE_NAMES = ("sample", "hidden_states", "x")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
SHARED_INPUTS = ("img_ids", "txt_ids")  # FLUX's [tokens, 3] position ids: never repeated, even when tokens == batch


def repeat_rows(value, batch: int, groups: int):
    """Repeat every tensor whose leading dimension is the batch, through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value] * groups, dim=0)
    if isinstance(value, dict):
        return {k: repeat_rows(v, batch, groups) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_rows(v, batch, groups) for v in value)
    return value


def cat_rows(values: list):
    """Row groups' inputs one after another: tensors along the batch, dicts key by key (SDXL's
    ``added_cond_kwargs``)."""
    if isinstance(values[0], dict):
        return {k: cat_rows([v[k] for v in values]) for k in values[0]}
    return torch.cat(values, dim=0)


def _as_float(t) -> float | None:
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


class _Signature:
    """Names a denoiser call's arguments from the model class's ``forward`` signature."""

    def __init__(self, module: torch.nn.Module):
        sig = inspect.signature(type(module).forward)
        params = list(sig.parameters.values())[1:]  # without self
        self.signature = sig.replace(parameters=params)
        names = [p.name for p in params]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.sample = next((n for n in _SAMPLE_NAMES if n in names), positional[0] if positional else "sample")
        self.timestep = next((n for n in _TIMESTEP_NAMES if n in names), "timestep")
        self.var_keyword = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)

    def inputs(self, args, kwargs) -> dict:
        """``{parameter name: value}`` for one call (``**kwargs`` spread out)."""
        try:
            bound = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # a call the signature does not describe: keyword arguments only
            bound = dict(kwargs)
        inputs = dict(bound)
        if self.var_keyword in inputs:
            inputs.update(inputs.pop(self.var_keyword))
        return inputs


class _DriverHook(ModelHook):
    """The driver's place in diffusers' hook chain: every call of the denoiser goes to the driver."""

    def __init__(self, driver: "DenoiserDriver"):
        super().__init__()
        self.driver = driver

    def new_forward(self, module, *args, **kwargs):
        return self.driver(*args, **kwargs)


def _state_managers(module: torch.nn.Module) -> list[StateManager]:
    """The state managers of the stateful (cache) hooks registered on ``module`` and its submodules."""
    found: dict[int, StateManager] = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if getattr(hook, "_is_stateful", False):
                found.update((id(v), v) for v in vars(hook).values() if isinstance(v, StateManager))
    return list(found.values())


class RowGroups:
    """One render's row groups, step by step: the strategy's plan, which groups to compute (the others reuse
    their last prediction), each group's weights as mixing-tensor rows, and the combined prediction.

    :class:`DenoiserDriver` keeps one for a render through the pipeline's own loop; the server's batcher keeps
    one per request in its shared batch, so the two cannot plan, reuse or combine differently.
    """

    def __init__(self, runtime, strategy: Strategy, adapters: list[str]):
        self.runtime = runtime
        self.strategy = strategy
        self.adapters = list(adapters)
        self.plan: StepPlan | None = None
        self.todo: list[int] = [0]  # the groups computed this step
        self._cache: dict[int, torch.Tensor] = {}

    def next(self, step: int, timestep: float | None, inputs: dict) -> StepPlan:
        """The plan for this denoiser call (``inputs``: the call's arguments by name, for ``observe``)."""
        self.strategy.observe(step, timestep, inputs)
        plan = self.strategy.plan(step, timestep)
        if plan.row_groups == 0:  # no adapters at all: the base model
            plan = StepPlan(torch.zeros(1, len(self.adapters)))
        if self._cache and max(self._cache) >= plan.row_groups:
            self._cache.clear()
        reuse = plan.reuse if plan.reuse is not None else torch.zeros(plan.row_groups, dtype=torch.bool)
        self.plan = plan
        self.todo = [g for g in range(plan.row_groups) if not (bool(reuse[g]) and g in self._cache)]
        return plan

    @property
    def single(self) -> bool:
        """One group, never reused: its pass's output is the prediction (nothing to cache or combine)."""
        return self.plan.row_groups == 1 and self.plan.reuse is None

    def slot_rows(self, weights: torch.Tensor, groups: list[int], rows: int) -> torch.Tensor:
        """``weights[groups]`` (``[groups, adapters]`` in strategy order) as mixing-tensor rows: each group's
        row repeated ``rows`` times (the render's batch), other slots at 0."""
        out = torch.zeros(len(groups), self.runtime.denoiser_mix.slots)
        for i, name in enumerate(self.adapters):
            out[:, self.runtime.slots[name]] = weights[groups, i]
        return out.repeat_interleave(rows, dim=0)

    def mixing_rows(self, groups: list[int], rows: int, layer_keys=()) -> tuple[torch.Tensor, dict]:
        """The mixing rows of ``groups`` and, per layer group in ``layer_keys`` or the plan's, its own rows
        (this plan's weights where it gives that layer group none)."""
        layer = self.plan.layer_weights or {}
        keys = set(layer_keys) | set(layer)
        return (
            self.slot_rows(self.plan.weights, groups, rows),
            {k: self.slot_rows(layer.get(k, self.plan.weights), groups, rows) for k in keys},
        )

    def store(self, groups: list[int], predictions) -> None:
        self._cache.update(zip(groups, predictions))

    def combine(self) -> torch.Tensor:
        """Every group's latest prediction mixed by the strategy (the plan's combine weights by default)."""
        predictions = torch.stack([self._cache[g] for g in range(self.plan.row_groups)])
        return self.strategy.combine(predictions, self.plan)

    def clear(self) -> None:
        self._cache.clear()


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
        self.groups = RowGroups(runtime, strategy, adapters)
        self._last_output = None
        self._signature = _Signature(denoiser)
        self._hook: _DriverHook | None = None
        self._had_registry = False
        self._saved_forward = None
        self._managers: list[StateManager] = []

    def _forward(self, chunk: list[int] | None, args, kwargs):
        """The rest of the hook chain; with ``chunk``, under a cache context of its own (module doc)."""
        forward = self._hook.fn_ref.original_forward
        outer = [m._context for m in self._managers]
        if chunk is None or not any(outer):
            return forward(*args, **kwargs)
        try:
            for m, ctx in zip(self._managers, outer):
                if ctx is not None:
                    name = f"{ctx.name}/row groups {','.join(map(str, chunk))}"
                    m.set_context(dataclasses.replace(ctx, name=name))
            return forward(*args, **kwargs)
        finally:
            for m, ctx in zip(self._managers, outer):
                m.set_context(ctx)

    def _run(self, plan: StepPlan, groups: list[int], args, kwargs, batch: int):
        """One denoiser pass over row ``groups`` of one batch; returns (output, per-group samples)."""
        rows, layer_rows = self.groups.mixing_rows(groups, batch)
        self.runtime.set_denoiser_rows(rows, layer_rows or None)
        own = plan.inputs[groups[0]].keys() if plan.inputs else ()
        if len(groups) > 1:
            shared = {k: v for k, v in kwargs.items() if k in SHARED_INPUTS or k in own}
            kwargs = {**repeat_rows({k: v for k, v in kwargs.items() if k not in shared}, batch, len(groups)), **shared}
            args = repeat_rows(tuple(args), batch, len(groups))
        for name in own:  # the row groups' own inputs, in the groups' order
            if name not in kwargs:
                raise ValueError(f"row-group input {name!r} is not a keyword input of this denoiser call")
            kwargs[name] = cat_rows([plan.inputs[g][name] for g in groups])
        chunk = groups if plan.row_groups > 1 else None
        output = self._last_output = self._forward(chunk, args, kwargs)
        self.calls += 1
        self.rows += batch * len(groups)
        return output, _sample_of(output).split(batch, dim=0)

    def __call__(self, *args, **kwargs):
        inputs = self._signature.inputs(args, kwargs)
        timestep = _as_float(inputs.get(self._signature.timestep))
        plan = self.groups.next(self.step, timestep, inputs)
        self.history.append(plan)
        self.step += 1
        sample = inputs[self._signature.sample]
        batch = sample.shape[0]
        if self.groups.single:
            return self._run(plan, [0], args, kwargs, batch)[0]

        todo = self.groups.todo
        per_pass = max(1, (self.max_batch or batch * plan.row_groups) // batch)
        output = None
        for start in range(0, len(todo), per_pass):
            chunk = todo[start : start + per_pass]
            output, samples = self._run(plan, chunk, args, kwargs, batch)
            self.groups.store(chunk, samples)
        if output is None:  # every group reused: no pass this step, same output type as the last one
            output = self._last_output
        return _with_sample(output, self.groups.combine().to(sample.dtype))

    def __enter__(self):
        self._had_registry = hasattr(self.denoiser, "_diffusers_hook")
        self._saved_forward = self.denoiser.__dict__.get("forward")  # an instance-level forward, if any
        self._hook = _DriverHook(self)
        HookRegistry.check_if_exists_or_initialize(self.denoiser).register_hook(self._hook, HOOK_NAME)
        self._managers = _state_managers(self.denoiser)
        return self

    def __exit__(self, *exc):
        registry = self.denoiser._diffusers_hook
        was_last = registry._hook_order[-1:] == [HOOK_NAME]  # else a later hook keeps the chain's head
        registry.remove_hook(HOOK_NAME, recurse=False)
        if was_last and self._saved_forward is None:
            self.denoiser.__dict__.pop("forward", None)  # remove_hook leaves a bound method on the instance
        if not self._had_registry and not registry.hooks:
            del self.denoiser._diffusers_hook
        self.groups.clear()
        self._managers = []
        return False
