"""One patched Linear or Conv2d: its adapters' factors stacked, a forward hook adding their delta.

The base module is not replaced: a forward hook adds ``((x A^T) * s) B^T`` to its output, so the
model's module tree, its ``state_dict`` and ``save_pretrained`` stay exactly as they were. Stacked
factors live on the module as non-persistent buffers, so ``pipe.to(device)`` moves them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from composer.runtime.mixing import MixingState
from kernels import fold_delta, stacked_delta

DOWN, UP = "_lora_composer_down", "_lora_composer_up"


@dataclass
class _Block:
    """The rank columns one adapter owns in this layer's stack."""

    slot: int
    rank: int
    scale: float  # alpha / r


class PatchedLayer:
    """Owns the hook, the stacked factors and the fused-mode backup of one base module."""

    def __init__(self, module: torch.nn.Module, mixer: MixingState, group: str | None = None):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise TypeError(f"cannot patch {type(module).__name__}")
        self.module = module
        self.mixer = mixer
        self.group = group  # layer group whose mixing weights this layer reads
        self.blocks: list[_Block] = []
        self.conv = (
            dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
            if isinstance(module, torch.nn.Conv2d)
            else None
        )
        self.backup: torch.Tensor | None = None  # base weight before fusing, restored bit-exactly
        self._cache_key = None
        self._cache = None
        self._subsets: dict[tuple[int, ...], tuple] = {}  # active slots -> (down, up, slot index, alpha)
        self._handle = module.register_forward_hook(self._hook)

    # -- stack management -------------------------------------------------------------------
    @property
    def down(self) -> torch.Tensor | None:
        return getattr(self.module, DOWN, None)

    @property
    def up(self) -> torch.Tensor | None:
        return getattr(self.module, UP, None)

    def add(self, slot: int, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        weight = self.module.weight
        down = down.to(device=weight.device, dtype=weight.dtype)
        up = up.to(device=weight.device, dtype=weight.dtype)
        if self.down is not None:
            down = torch.cat([self.down, down], dim=0)
            up = torch.cat([self.up, up], dim=1)
        self.module.register_buffer(DOWN, down.contiguous(), persistent=False)
        self.module.register_buffer(UP, up.contiguous(), persistent=False)
        self.blocks.append(_Block(slot, down.shape[0] - sum(b.rank for b in self.blocks), scale))
        self._stack_changed()

    def remove(self, slot: int) -> None:
        keep, start, new_blocks = [], 0, []
        for b in self.blocks:
            if b.slot != slot:
                keep.append(torch.arange(start, start + b.rank))
                new_blocks.append(b)
            start += b.rank
        self.blocks = new_blocks
        if not keep:
            delattr(self.module, DOWN)
            delattr(self.module, UP)
        else:
            idx = torch.cat(keep).to(self.down.device)
            self.module.register_buffer(DOWN, self.down.index_select(0, idx).contiguous(), persistent=False)
            self.module.register_buffer(UP, self.up.index_select(1, idx).contiguous(), persistent=False)
        self._stack_changed()

    @property
    def empty(self) -> bool:
        return not self.blocks

    def detach(self) -> None:
        """Remove the hook and the buffers, restoring the base weights if fused."""
        self.unfuse()
        self._handle.remove()
        for name in (DOWN, UP):
            if hasattr(self.module, name):
                delattr(self.module, name)
        self.blocks = []

    # -- scales --------------------------------------------------------------------------------
    def _stack_changed(self) -> None:
        self._cache_key = None
        self._subsets.clear()

    def _subset(self, active: tuple[int, ...]):
        """Factors, slot index and alpha/r of the rank columns of ``active`` slots (cached per subset).

        A run of consecutive blocks is a view of the stack (no copy): switching between single adapters
        costs nothing after the first time.
        """
        hit = self._subsets.get(active)
        if hit is not None:
            return hit
        starts, start = [], 0
        for b in self.blocks:
            starts.append(start)
            start += b.rank
        chosen = [(b, s) for b, s in zip(self.blocks, starts) if b.slot in active]
        slots = torch.cat([torch.full((b.rank,), b.slot, dtype=torch.long) for b, _ in chosen])
        alpha = torch.cat([torch.full((b.rank,), b.scale) for b, _ in chosen])
        first, last = chosen[0][1], chosen[-1][1] + chosen[-1][0].rank
        if last - first == slots.numel():  # contiguous: views
            down, up = self.down[first:last], self.up[:, first:last]
        else:
            idx = torch.cat([torch.arange(s, s + b.rank) for b, s in chosen]).to(self.down.device)
            down, up = self.down.index_select(0, idx), self.up.index_select(1, idx)
        if len(self._subsets) >= 8:
            self._subsets.pop(next(iter(self._subsets)))
        self._subsets[active] = hit = (down, up, slots, alpha)
        return hit

    def _rank_scale(self) -> torch.Tensor:
        """``[rows, R]`` over the whole stack: each column's adapter weight times its alpha / r."""
        _, _, slots, alpha = self._subset(tuple(b.slot for b in self.blocks))
        return self.mixer.weights_for(self.group)[:, slots] * alpha

    def refresh(self):
        """(down, up, scale) of the adapters with a non-zero weight, recomputed once per mixer version."""
        key = (self.mixer.version, self.module.weight.device, self.module.weight.dtype)
        if key != self._cache_key:
            self._cache_key, self._cache = key, None
            if self.blocks and self.mixer.enabled:
                live = self.mixer.active_slots
                active = tuple(b.slot for b in self.blocks if b.slot in live)
                if active:
                    down, up, slots, alpha = self._subset(active)
                    s = self.mixer.weights_for(self.group)[:, slots] * alpha
                    self._cache = (down, up, s.to(down.device))
        return self._cache

    def _hook(self, module, args, output):
        if self.backup is not None:
            return None  # fused: the delta is already in the weight
        active = self.refresh()
        if active is None:
            return None  # nothing acts: output is exactly the base layer's
        down, up, s = active
        return output + stacked_delta(args[0], down, up, s, self.conv)

    # -- fused mode -----------------------------------------------------------------------------
    def fuse(self) -> None:
        """Fold the current (uniform) weights into the base weight; refolds from the backup if fused."""
        if not self.mixer.is_uniform:
            raise ValueError("per-row mixing weights cannot be fused")
        weight = self.module.weight
        if self.backup is None:
            self.backup = weight.detach().clone()
        new = self.backup.float()
        if self.blocks and self.mixer.enabled:
            s = self._rank_scale()[0].to(weight.device)
            new = new + fold_delta(new, self.down, self.up, s).float()
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype) if new.dtype != weight.dtype else new)

    def unfuse(self) -> None:
        if self.backup is None:
            return
        with torch.no_grad():
            self.module.weight.copy_(self.backup)
        self.backup = None
