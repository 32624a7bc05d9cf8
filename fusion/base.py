"""The interface every fusion strategy implements.

For each denoiser call a strategy answers: how much of each adapter acts in each row group (and,
optionally, in each layer group), which row groups must be computed now and which may reuse their
last prediction, and how the groups' predictions are combined.

Two kinds of groups, not to be confused:

- **row groups** (``StepPlan.row_groups``): copies of the batch, each with its own adapter weights.
  ``weights[g, i]`` is adapter ``i``'s denoiser weight in row group ``g``. With one row group the whole
  batch shares the weights. With ``G`` row groups the batch is run once per group (as rows of one batched
  pass where memory allows) and the predictions are combined as ``sum_g combine[g] * pred_g`` (the mean by
  default): LoRA Composite without ``G`` sequential passes.
- **layer groups** (``StepPlan.layer_weights`` keys, ``StrategyContext.layer_groups``): blocks of the
  denoiser (``unet.down_blocks.1``...) that may get their own weights within every row group.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepPlan:
    """What one denoiser call does (``G`` = ``row_groups``).

    - ``weights``: ``[G, adapters]``, one row per row group.
    - ``layer_weights``: optional ``{layer group: [G, adapters]}`` overriding ``weights`` in those layer
      groups (e.g. ``unet.down_blocks.1``; see ``lora_composer.vocab.layer_group``).
    - ``combine``: optional ``[G]`` weights of the row groups' predictions (default: the mean).
    - ``reuse``: optional ``[G]`` booleans: reuse that row group's last prediction instead of computing it
      (the driver computes it anyway when nothing is cached yet).
    - ``inputs``: optional, one dict per row group of denoiser keyword inputs that replace the call's for that
      group's rows (e.g. its own ``encoder_hidden_states``), each with the call's batch as leading dimension.
    """

    weights: torch.Tensor
    layer_weights: dict[str, torch.Tensor] | None = None
    combine: torch.Tensor | None = None
    reuse: torch.Tensor | None = None
    inputs: list[dict[str, torch.Tensor]] | None = None

    @property
    def row_groups(self) -> int:
        """Number of row groups (copies of the batch), not layer groups."""
        return int(self.weights.shape[0])


@dataclass
class Region:
    """One region of a regional prompt, as the pipeline prepared it for a regional strategy.

    - ``prompt``: the region's text (the common text first), without LoRA tags.
    - ``adapters``: ``{name: denoiser weight}`` of the adapters acting in the region (its own and the common ones).
    - ``embeds``: ``{"positive": [1, tokens, dim], "negative": [1, tokens, dim] or None}``, the region's prompt
      encoded with only its adapters' text-encoder layers; SDXL adds ``pooled_positive`` and ``pooled_negative``.
    """

    prompt: str
    adapters: dict[str, float]
    embeds: dict[str, torch.Tensor | None]


@dataclass
class StrategyContext:
    """What a strategy may read from the generation, given to :meth:`Strategy.begin`.

    Every field has a default so a unit test can build one by hand (``StrategyContext()`` is a generation
    with nothing known). ``ComposerPipeline`` fills all of them.

    - ``adapters``: the generation's ``Adapter`` objects (factors, metadata), in the strategy's order.
    - ``runtime``: the ``LoraRuntime`` (attached adapters, mixing tensors).
    - ``layer_groups``: the denoiser's layer groups (``runtime.layer_groups()``), keys of ``layer_weights``.
    - ``num_train_timesteps``: the scheduler's training timesteps (to turn a timestep into a noise level).
    - ``cfg``: whether classifier-free guidance doubles the batch (``[negative, positive]``); ``None``
      when unknown.
    - ``pipe``: the diffusers pipeline, for anything else.
    - ``regions``: the prompt's regions (:class:`Region`), for strategies with ``regional = True``.
    """

    adapters: list = field(default_factory=list)
    runtime: Any = None
    layer_groups: list[str] = field(default_factory=list)
    num_train_timesteps: int = 1000
    cfg: bool | None = None
    pipe: Any = None
    regions: list[Region] = field(default_factory=list)

    def __post_init__(self):
        if not self.layer_groups and self.runtime is not None:
            self.layer_groups = list(self.runtime.layer_groups())

    @classmethod
    def from_pipeline(cls, pipe, runtime, adapters, guidance_scale: float | None = None) -> "StrategyContext":
        """The context of one generation of ``pipe`` (a diffusers pipeline) at ``guidance_scale``.

        ``cfg`` follows diffusers' pipelines: UNets double the batch at ``guidance_scale > 1`` without a guidance
        embedding (``time_cond_proj_dim``), SD3 at ``guidance_scale > 1``; FLUX never does (FLUX.1-dev's guidance
        is an input of the transformer, and its optional true CFG runs two separate calls). It is computed here
        because the pipeline's own flag only holds during its call. FLUX's transformer is given the timestep
        divided by the scheduler's 1000 (a noise level in [0, 1]), hence ``num_train_timesteps`` 1 there.
        """
        config = getattr(getattr(pipe, "scheduler", None), "config", None)
        unet = getattr(pipe, "unet", None)
        transformer = getattr(pipe, "transformer", None) if unet is None else None
        flux = transformer is not None and "Flux" in type(transformer).__name__
        cfg = None
        if guidance_scale is not None and unet is not None:
            cfg = float(guidance_scale) > 1 and getattr(unet.config, "time_cond_proj_dim", None) is None
        elif transformer is not None:
            cfg = False if flux else (None if guidance_scale is None else float(guidance_scale) > 1)
        steps = 1 if flux else getattr(config, "num_train_timesteps", None) or 1000
        return cls(adapters=list(adapters), runtime=runtime, num_train_timesteps=int(steps), cfg=cfg, pipe=pipe)

    def adapter(self, name: str):
        """The ``Adapter`` named ``name``: given here, else attached to the runtime (``KeyError`` if neither)."""
        for ad in self.adapters:
            if ad.name == name:
                return ad
        return getattr(self.runtime, "adapters", {})[name]


def _plain(value):
    """A recorded value as JSON holds it: tuples as lists, infinities as text, paths and the rest as text."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class _Measured:
    """``Strategy.measured``: the strategy's line from the recorded results, looked up by its ``name``."""

    def __get__(self, obj, owner) -> str:
        from lora_composer import measured

        return measured.line(owner.name)


class Strategy(ABC):
    """Decides per-step, per-row-group (and optionally per-layer-group) adapter weights. Subclasses set ``name`` and implement ``plan``."""

    name: str = ""
    # True: the prompt is split into regions (``BREAK``) and the pipeline gives them in ``context.regions``
    regional: bool = False
    # True: fitted once per LoRA set before it renders (seconds of CPU per set): ``compose eval`` measures it only
    # when asked by name
    fitted: bool = False
    # What it measured on the mini worlds, one line read from the recorded ``compose eval`` runs
    # (lora_composer.measured): ``compose --help`` and the web UI show it, so a user picks a strategy by what it
    # did, not by its paper's claim.
    measured: str = _Measured()

    def begin(
        self, adapters: list[str], weights: list[float], num_steps: int, context: StrategyContext | None = None
    ) -> None:
        """Called once per generation with the adapters (in order), their user weights and the step count.

        ``context`` (a :class:`StrategyContext`) carries what some strategies need from the pipeline;
        strategies that need nothing ignore it. ``None``: an empty context.
        """
        self.adapters = list(adapters)
        self.user_weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.num_steps = int(num_steps)
        if context is not None and not isinstance(context, StrategyContext):
            raise TypeError(f"context must be a StrategyContext, got {type(context).__name__}")
        self.context = context if context is not None else StrategyContext()

    def observe(self, step: int, timestep: float | None, inputs: dict) -> None:
        """Called before ``plan`` with the denoiser call's inputs (``sample``, ``encoder_hidden_states``...),
        for strategies that react to them (e.g. gates from the prompt's embeddings). Default: nothing."""

    def text_mask(self) -> torch.Tensor | None:
        """Optional ``[adapters]`` factors on the text-encoder weights for this generation (the prompt is
        encoded once, before the first step). ``None``: every adapter at its text-encoder weight."""
        return None

    @property
    def static(self) -> bool:
        """True when every step gets the same single-group weights (so the deltas may be fused)."""
        return False

    def derived_adapters(self) -> dict | None:
        """Optional, for static strategies that rewrite the adapters themselves (e.g. activation-matched fusion).

        Called once after :meth:`begin`: ``{original name: Adapter}``, each derived adapter under a name not
        attached yet. ``ComposerPipeline`` attaches them for this call only, gives each its original's text-encoder
        weight (the originals act with weight 0) and drives them in the originals' places (``plan`` weights keep
        the strategy's order), fuses them when asked, then detaches them: the pipeline is exactly as before.
        ``None`` (default): the originals act.
        """
        return None

    @abstractmethod
    def plan(self, step: int, timestep: float | None) -> StepPlan:
        """Weights for denoiser call ``step`` (0-based) at ``timestep``."""

    def combine(self, predictions: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """The denoiser call's prediction from its row groups' predictions (``[G, batch, ...]``, in row-group
        order; ``plan`` is this call's plan). Called by the driver when ``plan`` has several row groups or
        ``reuse``. Default: ``sum_g plan.combine[g] * predictions[g]`` (the mean without ``combine``).
        Strategies that combine non-linearly (per patch, per CFG half: ``context.cfg`` says whether the
        batch is ``[negative, positive]``) override it."""
        weights = plan.combine if plan.combine is not None else torch.full((plan.row_groups,), 1.0 / plan.row_groups)
        return sum(float(weights[g]) * predictions[g] for g in range(plan.row_groups))

    def patched(self, denoiser: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Changes the strategy makes inside ``denoiser`` for one generation, undone exactly on exit (e.g. how
        its attention layers run). Default: none."""
        return contextlib.nullcontext()

    def patches(self, denoiser: torch.nn.Module) -> bool:
        """Whether :meth:`patched` changes ``denoiser``: a render that patches it cannot share a denoiser pass
        with other renders (the server runs it alone). Default: whether the class overrides :meth:`patched`."""
        return type(self).patched is not Strategy.patched

    def describe(self) -> dict:
        """Parameters recorded with the image: every constructor argument, read from the attribute of its name
        (its default where there is none), then what :meth:`resolved` adds. Built from the signature so a new
        argument is recorded without listing it twice."""
        out = {}
        for param in list(inspect.signature(type(self).__init__).parameters.values())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            value = getattr(self, param.name, param.default)
            if callable(value):  # an argument named like a method (dare's ``combine``): resolved() records it
                continue
            out[param.name] = _plain(value)
        out.update({k: _plain(v) for k, v in self.resolved().items()})
        return out

    def resolved(self) -> dict:
        """What this generation decided that its arguments do not say (an order it chose, a value it derived);
        recorded with the image, overriding the argument of the same name. Default: nothing."""
        return {}


class DerivedMerge(Strategy):
    """Base of the static strategies that rewrite their adapters once per generation and then run as merge
    (TIES, DARE, TSV, K-LoRA, activation-matched, fit): :meth:`build_derived` returns the rewritten adapters,
    the pipeline attaches them for the call in the originals' places (:meth:`Strategy.derived_adapters`), and
    every step is one group at the user weights (one pass per step, fusable)."""

    suffix = "~derived"  # appended to a derived adapter's name
    _derived: dict | None = None

    @property
    def static(self) -> bool:
        return True

    def begin(self, adapters, weights, num_steps, context=None) -> None:
        super().begin(adapters, weights, num_steps, context)
        self._derived = self.build_derived() if self.adapters else None

    def derived_adapters(self) -> dict | None:
        return self._derived or None

    def plan(self, step: int, timestep: float | None) -> StepPlan:
        return StepPlan(self.user_weights.unsqueeze(0))

    def source_adapters(self) -> list | None:
        """The adapters of this generation, in order; ``None`` when the context holds none to read (a bare
        ``StrategyContext``: then the strategy is plain merge)."""
        ctx = self.context
        if ctx.runtime is None and not ctx.adapters:
            return None
        return [ctx.adapter(n) for n in self.adapters]

    @abstractmethod
    def build_derived(self) -> dict | None:
        """``{original name: derived Adapter}`` for this generation (named ``original + suffix``); ``None``:
        the originals act (plain merge)."""
