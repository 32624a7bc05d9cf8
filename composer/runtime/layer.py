"""One patched Linear or Conv2d: its adapters' factors stacked, a forward hook adding their delta.

The base module is not replaced: a forward hook adds ``((x A^T) * s) B^T`` to its output, so the
model's module tree, its ``state_dict`` and ``save_pretrained`` stay exactly as they were. Stacked
factors live on the module as non-persistent buffers, so ``pipe.to(device)`` moves them too.

Adapters without exact low-rank factors (LyCORIS full/diff, DoRA, IA3, a LoKr with full-size sides) act
through a dense delta ``(dW, db)`` per adapter, computed once against the base weight when attached:
the hook adds ``x dW^T + db`` weighted per row, fusing adds ``sum_i w_i dW_i`` to the weight and
``sum_i w_i db_i`` to the bias (both backed up and restored bit-exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_composer.runtime.mixing import MixingState
from lora_composer.kernels import fold_delta, sparse_delta, sparse_fold, sparse_restore, stacked_delta
from lora_composer.kernels.sparse_ops import merge_sparse, merged_values, sparse_conv_delta

DOWN, UP = "_lora_composer_down", "_lora_composer_up"
NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm)


def _norm_args(module: torch.nn.Module):
    if isinstance(module, torch.nn.LayerNorm):
        return ("layer", tuple(module.normalized_shape), module.eps)
    if isinstance(module, torch.nn.GroupNorm):
        return ("group", module.num_groups, module.eps)
    return None


@dataclass
class _Block:
    """The rank columns one adapter owns in this layer's stack."""

    slot: int
    rank: int
    scale: float  # alpha / r


class PatchedLayer:
    """Owns the hook, the stacked factors and the fused-mode backup of one base module."""

    def __init__(self, module: torch.nn.Module, mixer: MixingState, group: str | None = None, reserve: int = 0):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, *NORMS)):
            raise TypeError(f"cannot patch {type(module).__name__}")
        self.module = module
        self.mixer = mixer
        self.group = group  # layer group whose mixing weights this layer reads
        self.blocks: list[_Block] = []
        self.rank = 0  # rank columns in use at the front of the stack's storage
        self.reserve = int(reserve)  # adapters the first allocation makes room for (then the capacity doubles)
        self.tokens: int | None = None  # positions per batch row in the last input (for the fuse cost model)
        self.conv = (
            dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
            if isinstance(module, torch.nn.Conv2d)
            else None
        )
        # a norm layer (dense deltas only: LyCORIS norms): F.layer_norm / F.group_norm's arguments besides weights
        self.norm = _norm_args(module)
        self.backup: torch.Tensor | None = None  # base weight before fusing, restored bit-exactly
        self.slot_index = torch.zeros(0, dtype=torch.long)  # adapter slot of each rank column
        self.alpha = torch.zeros(0)  # alpha / r of each rank column
        self.offset = 0  # first column of this layer in the mixer's scale table
        self._cache_key = None
        self._cache = None
        self._row_runs = None  # per-row column runs of the cached version (see row_runs)
        self._runs: dict[frozenset[int], list[tuple[int, int]]] = {}
        self._spans: dict[int, tuple[int, int]] = {}  # slot -> its columns in the stack
        # SHiRA adapters: slot -> (sorted unique flat positions, fp32 values times alpha), on the weight's device
        self.sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sparse_backup: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, overwritten values)
        self._unions: dict[frozenset[int], tuple] = {}  # live sparse slots -> merge_sparse(...)
        self._sparse_key = None
        self._sparse_cache = None
        self._live_key: frozenset[int] = frozenset()  # the live slots behind _sparse_cache
        # while fused: live sparse slots -> (positions, the base weight's values there), so that fusing a set
        # again in this fused session skips reading the weight (one scatter, no gather); cleared by unfuse
        self._kept: dict[frozenset[int], tuple[torch.Tensor, torch.Tensor]] = {}
        # dense deltas: slot -> (dW fp32 shaped like the weight, db fp32 or None), on the weight's device
        self.dense: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # dense deltas not linear in their weight (PEFT-scaled DoRA): slot -> at(w) giving (dW, db) at weight w
        self.dense_at: dict[int, object] = {}
        self._at_cache: dict[tuple[int, float], tuple] = {}
        self.bias_backup: torch.Tensor | None = None
        self._dense_key = None
        self._dense_cache = None
        self._handle = module.register_forward_hook(self._hook)
        mixer.attach(self)

    # -- stack management -------------------------------------------------------------------
    @property
    def down(self) -> torch.Tensor | None:
        """``[R, ...]``: the used rows of the down stack (a view of its storage)."""
        store = getattr(self.module, DOWN, None)
        return None if store is None else store[: self.rank]

    @property
    def up(self) -> torch.Tensor | None:
        """``[out, R, ...]``: the used columns of the up stack (a view of its storage, which is kept rank-major,
        ``[capacity, out, ...]``, so that an adapter's columns are one contiguous block to write)."""
        store = getattr(self.module, UP, None)
        return None if store is None else store[: self.rank].transpose(0, 1)

    @property
    def capacity(self) -> int:
        """Rank columns the stack's storage holds before it must grow."""
        store = getattr(self.module, DOWN, None)
        return 0 if store is None else int(store.shape[0])

    def _reserve(self, need: int, like_down: torch.Tensor, like_up: torch.Tensor) -> None:
        """Make the storage hold ``need`` rank columns, doubling its capacity when it grows: attaching K
        adapters copies each layer's stack O(log K) times instead of K times (none up to ``reserve``)."""
        if need <= self.capacity:
            return
        # ``reserve`` adapters of this one's rank up front: on the CPU an allocation is only address space until
        # written, so attaching up to that many copies nothing at all
        cap = max(need, 2 * self.capacity, self.reserve * like_down.shape[0])
        down = like_down.new_empty(cap, *like_down.shape[1:])  # columns past the rank in use are never read
        up = like_up.new_empty(cap, like_up.shape[0], *like_up.shape[2:])
        if self.rank:
            down[: self.rank] = self.down
            up[: self.rank] = getattr(self.module, UP)[: self.rank]
        self.module.register_buffer(DOWN, down, persistent=False)
        self.module.register_buffer(UP, up, persistent=False)

    def add(self, slot: int, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        weight = self.module.weight
        down = down.to(device=weight.device, dtype=weight.dtype)
        up = up.to(device=weight.device, dtype=weight.dtype)
        start, r = self.rank, down.shape[0]
        self._reserve(start + r, down, up)
        with torch.no_grad():
            getattr(self.module, DOWN)[start : start + r] = down
            getattr(self.module, UP)[start : start + r] = up.transpose(0, 1)
        self.rank = start + r
        block = _Block(slot, r, scale)
        self.blocks.append(block)
        # the new block's columns are appended: extend the per-column tables instead of rebuilding them
        self.slot_index = torch.cat([self.slot_index, torch.full((r,), slot, dtype=torch.long)])
        self.alpha = torch.cat([self.alpha, torch.full((r,), scale)])
        self._spans[slot] = (start, start + r)
        self._layout_changed()

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
            self.rank = 0
        else:
            idx = torch.cat(keep).to(self.down.device)
            down, up = self.down.index_select(0, idx), getattr(self.module, UP).index_select(0, idx)
            self.rank = int(idx.numel())
            with torch.no_grad():  # compacted in place: the storage keeps its capacity
                getattr(self.module, DOWN)[: self.rank] = down
                getattr(self.module, UP)[: self.rank] = up
        self._stack_changed()

    def add_sparse(self, slot: int, flat_index: torch.Tensor, values: torch.Tensor, scale: float) -> None:
        """Attach a SHiRA delta: ``weight.flat[flat_index] += scale * values`` when it acts."""
        dev = self.module.weight.device
        self.sparse[slot] = (flat_index.to(dev, torch.long).contiguous(), (values.float() * scale).to(dev).contiguous())
        self._sparse_changed()

    def remove_sparse(self, slot: int) -> None:
        self.sparse.pop(slot, None)
        self._sparse_changed()

    def _sparse_changed(self) -> None:
        self._unions.clear()
        self._kept.clear()
        self._sparse_key = None

    def add_dense(self, slot: int, dw: torch.Tensor, db: torch.Tensor | None, at=None) -> None:
        """Attach a dense delta: ``weight += w * dw`` and ``bias += w * db`` when it acts with weight ``w``; or,
        given ``at``, ``(dW, db) = at(w)`` (a delta not linear in its weight)."""
        weight, bias = self.module.weight, self.module.bias
        if db is not None and bias is None:
            raise ValueError("a bias delta for a layer without bias")
        dev = weight.device
        self.dense[slot] = (dw.float().to(dev).contiguous(), None if db is None else db.float().to(dev).reshape(-1))
        if at is not None:
            self.dense_at[slot] = at
        self._dense_key = None

    def remove_dense(self, slot: int) -> None:
        self.dense.pop(slot, None)
        self.dense_at.pop(slot, None)
        self._at_cache = {k: v for k, v in self._at_cache.items() if k[0] != slot}
        self._dense_key = None

    def dense_for(self, slot: int, w: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dW, db)`` of a dense slot acting with weight ``w``."""
        at = self.dense_at.get(slot)
        if at is None or w == 0.0:  # weight 0 is off, for every kind
            dw, db = self.dense[slot]
            return w * dw, None if db is None else w * db
        key = (slot, float(w))
        if key not in self._at_cache:
            if len(self._at_cache) >= 64:
                self._at_cache.clear()
            dev = self.module.weight.device
            dw, db = at(float(w))
            self._at_cache[key] = (dw.float().to(dev), None if db is None else db.float().to(dev).reshape(-1))
        return self._at_cache[key]

    def holds_any(self, slots) -> bool:
        return any(self.holds(s) for s in slots)

    def holds(self, slot: int) -> bool:
        return slot in self.sparse or slot in self.dense or any(b.slot == slot for b in self.blocks)

    @property
    def empty(self) -> bool:
        return not self.blocks and not self.sparse and not self.dense

    @property
    def fused(self) -> bool:
        return self.backup is not None or self.sparse_backup is not None or self.bias_backup is not None

    def detach(self) -> None:
        """Remove the hook and the buffers, restoring the base weights if fused."""
        self.unfuse()
        self._handle.remove()
        for name in (DOWN, UP):
            if hasattr(self.module, name):
                delattr(self.module, name)
        self.blocks = []
        self.rank = 0
        self.sparse = {}
        self.dense = {}
        self.dense_at = {}
        self._at_cache = {}
        self.mixer.detach(self)

    # -- scales --------------------------------------------------------------------------------
    def _stack_changed(self) -> None:
        self.slot_index = torch.cat(
            [torch.full((b.rank,), b.slot, dtype=torch.long) for b in self.blocks] or [self.slot_index[:0]]
        )
        self.alpha = torch.cat([torch.full((b.rank,), b.scale) for b in self.blocks] or [self.alpha[:0]])
        self._spans, start = {}, 0
        for b in self.blocks:
            self._spans[b.slot] = (start, start + b.rank)
            start += b.rank
        self._layout_changed()

    def _layout_changed(self) -> None:
        self._cache_key = None
        self._runs.clear()
        self.mixer.layout_changed()

    def runs(self, live: frozenset[int]) -> list[tuple[int, int]]:
        """Column ranges ``[start, end)`` of consecutive blocks whose adapter is live (cached per live set).

        The delta is computed on these views of the stack: no copy, and inactive adapters cost nothing.
        Built from the live slots (usually few), not from every block attached.
        """
        hit = self._runs.get(live)
        if hit is None:
            spans = sorted(self._spans[slot] for slot in live if slot in self._spans)
            hit = []
            for start, end in spans:
                if hit and hit[-1][1] == start:
                    hit[-1] = (hit[-1][0], end)
                else:
                    hit.append((start, end))
            if len(self._runs) >= 32:
                self._runs.clear()
            self._runs[live] = hit
        return hit

    def _rank_scale(self) -> torch.Tensor:
        """``[rows, R]``: each column's adapter weight times its alpha / r (a view of the mixer's table)."""
        table = self.mixer.scale_table(self.group, self.module.weight.device)
        return table[:, self.offset : self.offset + self.slot_index.numel()]

    def refresh(self):
        """(scale, runs) of the adapters with a non-zero weight, recomputed once per mixer version."""
        mixer = self.mixer
        key = (mixer.version, mixer.layout_version, self.module.weight.device)
        if key != self._cache_key:
            self._cache_key, self._cache = key, None
            if self.blocks and mixer.enabled:
                runs = self.runs(mixer.active_slots)
                if runs:
                    self._cache = (self._rank_scale(), runs)
                    self._row_runs = self.row_runs(runs)
        return self._cache

    # Multiply-adds a group of rows must save to pay for its own products (index, two GEMMs or convolutions,
    # scatter back), measured on one CPU thread: convolutions cost far more per call than matrix products.
    GROUP_MIN_MACS = {"linear": 1e6, "conv": 1e7}

    def row_runs(self, runs: list[tuple[int, int]]):
        """``(groups, columns saved)`` when rows use different adapters and computing each row's own columns
        at most halves the work (``groups``: ``[(row indices, column runs)]``; ``columns saved``: rank columns x
        rows left out); else None (one product over the live columns). The hook decides with the row size."""
        sets = self.mixer.row_sets(self.group)
        if not sets:
            return None
        grouped = [(rows, self.runs(live)) for rows, live in sets]
        grouped = [(rows, r) for rows, r in grouped if r]
        if not grouped:
            return None
        width = lambda rs: sum(b - a for a, b in rs)  # noqa: E731
        dense = int(self.mixer.weights_for(self.group).shape[0]) * width(runs)
        own = sum(len(rows) * width(r) for rows, r in grouped)
        return (grouped, dense - own) if own <= 0.5 * dense else None

    def _grouped(self, x: torch.Tensor):
        """The row groups of this call if they pay for themselves at this input's size (see GROUP_MIN_MACS)."""
        if self._row_runs is None:
            return None
        groups, columns_saved = self._row_runs
        macs_per_column = self.tokens * (self.down[0].numel() + self.up.shape[0])
        if columns_saved * macs_per_column < len(groups) * self.GROUP_MIN_MACS["conv" if self.conv else "linear"]:
            return None
        return groups

    def _sparse_live(self) -> list[int]:
        live = self.mixer.active_slots  # computed once per weight change for all layers
        return [slot for slot in sorted(self.sparse) if slot in live]

    def _union(self, live: list[int]):
        key = frozenset(live)
        hit = self._unions.get(key)
        if hit is None:
            if len(self._unions) >= 32:
                self._unions.clear()
            hit = self._unions[key] = merge_sparse([self.sparse[s][0] for s in live])
        return hit

    def sparse_refresh(self):
        """(positions, values ``[rows, N]``) of the live SHiRA adapters, weighted, once per mixer version."""
        mixer = self.mixer
        key = (mixer.version, self.module.weight.device)
        if key != self._sparse_key:
            self._sparse_key, self._sparse_cache = key, None
            if self.sparse and mixer.enabled:
                live = self._sparse_live()
                if live:
                    self._live_key = frozenset(live)
                    union, inverse = self._union(live)
                    rows = []
                    for weights in mixer.rows_for(self.group):
                        scaled = []
                        for s in live:
                            w = weights[s]
                            scaled.append(self.sparse[s][1] if w == 1.0 else self.sparse[s][1] * w)
                        rows.append(merged_values(union, inverse, scaled))
                    values = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
                    self._sparse_cache = (union, values.to(self.module.weight.device))
        return self._sparse_cache

    def dense_refresh(self):
        """``(live slots, weights [rows, live], summed dW, summed db, uniform)`` of the dense deltas, once per
        mixer version; the sums (weighted by row 0) serve when every row carries the same weights (uniform)."""
        mixer = self.mixer
        key = (mixer.version, self.module.weight.device)
        if key != self._dense_key:
            self._dense_key, self._dense_cache = key, None
            if self.dense and mixer.enabled:
                live = [s for s in sorted(self.dense) if s in mixer.active_slots]
                if live:
                    w = mixer.weights_for(self.group)[:, live].float()
                    parts = [self.dense_for(s, float(w[0, i])) for i, s in enumerate(live)]
                    dw = sum(p[0] for p in parts)
                    dbs = [p[1] for p in parts if p[1] is not None]
                    db = sum(dbs) if dbs else None
                    uniform = w.shape[0] == 1 or bool((w == w[:1]).all())
                    self._dense_cache = (live, w.to(self.module.weight.device), dw, db, uniform)
        return self._dense_cache

    def apply_dense(self, x: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
        """The output of a dense weight delta ``dw`` (the module's weight shape) and bias ``db`` on ``x``, with
        the module's own convolution settings."""
        dw = dw.to(x.dtype)
        db = None if db is None else db.to(x.dtype)
        if self.norm is not None:  # norm(x; W + dW, b + db) - norm(x; W, b) = x̂ dW + db
            kind, arg, eps = self.norm
            if kind == "layer":
                return F.layer_norm(x, arg, dw, db, eps)
            return F.group_norm(x, arg, dw, db, eps)
        if self.conv is None:
            return F.linear(x, dw, db)
        return F.conv2d(x, dw, db, **self.conv)

    def _dense_delta(self, x: torch.Tensor, cache) -> torch.Tensor:
        live, w, dw, db, uniform = cache
        if uniform:
            return self.apply_dense(x, dw, db)
        if x.shape[0] != w.shape[0]:
            raise ValueError(f"mixing tensor has {w.shape[0]} rows but the batch has {x.shape[0]}")
        total = None
        for i, s in enumerate(live):
            if s in self.dense_at:  # not linear in its weight: each row with its own weight's delta
                part = torch.cat(
                    [self.apply_dense(x[r : r + 1], *self.dense_for(s, float(w[r, i]))) for r in range(x.shape[0])]
                )
            else:
                col = w[:, i].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
                part = self.apply_dense(x, *self.dense[s]) * col
            total = part if total is None else total + part
        return total

    def _hook(self, module, args, output):
        x = args[0]
        self.tokens = x.numel() // max(1, x.shape[0] * x.shape[1 if self.conv is not None else -1])  # per row
        if self.fused:
            return None  # fused: the delta is already in the weight
        active = self.refresh() if self.blocks else None
        sparse = self.sparse_refresh() if self.sparse else None
        dense = self.dense_refresh() if self.dense else None
        if dense is not None:
            output = output + self._dense_delta(args[0], dense)
        if active is None and sparse is None:
            return output if dense is not None else None  # nothing acts: output is exactly the base layer's
        if active is not None:
            s, runs = active
            output = stacked_delta(
                args[0], self.down, self.up, s, self.conv, runs, out=output, row_runs=self._grouped(args[0])
            )
        if sparse is not None:
            idx, vals = sparse
            if self.conv is None:
                output = output + sparse_delta(args[0], idx, vals, output.shape[-1])
            else:  # conv: the sparse kernel materialised, one dense convolution (kernels/sparse_ops.py)
                output = output + sparse_conv_delta(args[0], idx, vals, tuple(self.module.weight.shape), self.conv)
        return output

    # -- fused mode -----------------------------------------------------------------------------
    def fuse(self, checked: bool = False) -> None:
        """Fold the current (uniform) weights into the base weight; refolds from the backup if fused.

        Low-rank adapters: ``W = backup + B diag(s) A`` (one fp32 GEMM), ``backup`` a clone of the weight.
        A layer holding only SHiRA adapters is fused by scatter instead: the backup is only the values at
        the live adapters' positions, so a switch costs O(nonzeros) and restores bit-exactly.
        ``checked``: the caller has already made sure the weights are uniform (once for all layers).
        """
        if not checked and not self.mixer.is_uniform:
            raise ValueError("per-row mixing weights cannot be fused")
        weight = self.module.weight
        sparse = self.sparse_refresh() if self.sparse else None
        dense = self.dense_refresh() if self.dense else None
        dense_live = bool(self.blocks) and self.mixer.enabled and self.refresh() is not None
        dense_live = dense_live or dense is not None
        if not dense_live and self.backup is None:
            self._restore_sparse()
            self._restore_bias()
            if sparse is not None:
                self._fold_sparse(weight, *sparse)
            return
        self._restore_sparse()
        if self.backup is None:
            self.backup = weight.detach().clone()
        new = self.backup.float()
        if self.blocks and self.mixer.enabled:
            s = self._rank_scale()[0]
            new = new + fold_delta(new, self.down, self.up, s).float()
        if dense is not None:
            new = new + dense[2]
        if sparse is not None:
            idx, vals = sparse
            new = new.clone() if new.data_ptr() == self.backup.data_ptr() else new
            new.view(-1).index_add_(0, idx, vals[0])
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype) if new.dtype != weight.dtype else new)
        self._restore_bias()
        if dense is not None and dense[3] is not None:
            bias = self.module.bias
            self.bias_backup = bias.detach().clone()
            with torch.no_grad():
                bias.copy_((self.bias_backup.float() + dense[3]).to(bias.dtype))

    def _restore_bias(self) -> None:
        if self.bias_backup is not None:
            with torch.no_grad():
                self.module.bias.copy_(self.bias_backup)
            self.bias_backup = None

    def _fold_sparse(self, weight: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """Scatter the live SHiRA values into the (base) weight, keeping the overwritten values per live set."""
        kept = self._kept.get(self._live_key)
        with torch.no_grad():
            backup = sparse_fold(weight, idx, vals[0], backup=kept[1] if kept and kept[0] is idx else None)
        if len(self._kept) >= 32:
            self._kept.clear()
        self._kept[self._live_key] = self.sparse_backup = (idx, backup)

    def _restore_sparse(self) -> None:
        if self.sparse_backup is not None:
            with torch.no_grad():
                sparse_restore(self.module.weight, *self.sparse_backup)
            self.sparse_backup = None

    def unfuse(self) -> None:
        self._restore_sparse()
        self._restore_bias()
        self._kept.clear()  # unfused, the weight is the user's again: forget what it held
        if self.backup is None:
            return
        with torch.no_grad():
            self.module.weight.copy_(self.backup)
        self.backup = None
