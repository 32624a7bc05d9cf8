"""The mixing tensor: how much of each adapter acts, per batch row.

Every patched layer of one component group reads the same ``MixingState``. Changing weights between
denoising steps is one small tensor write plus a version bump. The per-rank scales of *all* layers are
then one gather (``scale_table``): each layer reads its columns as a view, so a weight change costs the
same whatever the number of layers and adapters loaded.
"""

from __future__ import annotations

import torch


class MixingState:
    """``weights[rows, slots]``: row ``i`` of the batch gets ``weights[i, slot]`` of each adapter.

    One row broadcasts to the whole batch (merge); ``rows == batch`` routes adapters per row
    (Composite-style row groups). Slots are assigned by the runtime and shared by all layers.
    """

    def __init__(self, slots: int = 0):
        self.weights = torch.zeros(1, slots)
        self.layer_weights: dict[str, torch.Tensor] = {}  # per layer group overrides, same shape as weights
        self.enabled = True
        self.version = 0
        self._active: tuple[int, frozenset[int]] = (-1, frozenset())
        self.layers: list = []  # PatchedLayers reading this state, in column-table order
        self.layout_version = 0
        self._columns: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (layout version, slots, alpha)
        self._tables: dict = {}
        self._rows_cache: dict = {}
        self._row_sets: dict = {}

    # -- column table: every layer's rank columns, concatenated --------------------------------------
    def attach(self, layer) -> None:
        self.layers.append(layer)
        self.layout_changed()

    def detach(self, layer) -> None:
        self.layers.remove(layer)
        self.layout_changed()

    def layout_changed(self) -> None:
        """A layer's stack changed: column offsets must be recomputed."""
        self.layout_version += 1
        self._tables.clear()

    def _column_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._columns is None or self._columns[0] != self.layout_version:
            offset, slots, alpha = 0, [], []
            for layer in self.layers:
                layer.offset = offset
                offset += layer.slot_index.numel()
                slots.append(layer.slot_index)
                alpha.append(layer.alpha)
            cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)
            self._columns = (self.layout_version, cat(slots, torch.long), cat(alpha, torch.float32))
        return self._columns[1], self._columns[2]

    def scale_table(self, group: str | None, device: torch.device) -> torch.Tensor:
        """``[rows, total rank columns]``: weight times alpha / r for every column of every layer, for the
        weights layers of ``group`` read; one gather per (version, group, device)."""
        key = (self.version, self.layout_version, group if group in self.layer_weights else None, device)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 64:
                self._tables.clear()
            slots, alpha = self._column_index()
            # index_select, not ``w[:, slots]``: advanced indexing is ~300x slower on the CPU for long indices
            table = self._tables[key] = (self.weights_for(group).index_select(1, slots) * alpha).to(device)
        return table

    def weights_for(self, group: str | None) -> torch.Tensor:
        """The ``[rows, slots]`` weights a layer of ``group`` reads (its override, else the shared ones)."""
        return self.layer_weights.get(group, self.weights) if group is not None else self.weights

    def rows_for(self, group: str | None) -> list[list[float]]:
        """:meth:`weights_for` as Python floats, converted once per version: layers that read single weights
        (SHiRA values) would otherwise index a tensor per layer per adapter."""
        key = (self.version, group if group in self.layer_weights else None)
        hit = self._rows_cache.get(key)
        if hit is None:
            if len(self._rows_cache) > 64:
                self._rows_cache.clear()
            hit = self._rows_cache[key] = self.weights_for(group).tolist()
        return hit

    def row_sets(self, group: str | None) -> list[tuple[torch.Tensor, frozenset[int]]] | None:
        """Rows grouped by which slots act in them: ``[(row indices, live slots)]`` (rows where nothing acts
        left out), or None when every row has the same live slots. A batch of requests with different LoRA
        sets then computes each row's own adapters only (punica's segmented idea, on whole rows)."""
        key = (self.version, group if group in self.layer_weights else None)
        hit = self._row_sets.get(key, False)
        if hit is False:
            if len(self._row_sets) > 64:
                self._row_sets.clear()
            weights = self.weights_for(group)
            hit = None
            if weights.shape[0] > 1:
                support, inverse = torch.unique(weights != 0, dim=0, return_inverse=True)
                if support.shape[0] > 1:
                    hit = [
                        (torch.nonzero(inverse == i).flatten(), frozenset(row.nonzero().flatten().tolist()))
                        for i, row in enumerate(support)
                        if bool(row.any())
                    ]
            self._row_sets[key] = hit
        return hit

    @property
    def active_slots(self) -> frozenset[int]:
        """Slots with a non-zero weight in any row or layer group (computed once per version)."""
        if self._active[0] != self.version:
            nonzero = torch.zeros(self.slots, dtype=torch.bool)
            for w in [self.weights, *self.layer_weights.values()]:
                nonzero |= (w != 0).any(dim=0)
            self._active = (self.version, frozenset(nonzero.nonzero().flatten().tolist()))
        return self._active[1]

    @property
    def slots(self) -> int:
        return self.weights.shape[1]

    def resize(self, slots: int) -> None:
        """Grow or shrink the slot axis, keeping existing weights."""
        new = torch.zeros(self.weights.shape[0], slots)
        keep = min(slots, self.slots)
        new[:, :keep] = self.weights[:, :keep]
        self.weights = new
        self.layer_weights = {}
        self.version += 1

    def _rows(self, weights) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)
        if weights.shape[1] != self.slots:
            raise ValueError(f"expected weights for {self.slots} adapter slots, got {weights.shape[1]}")
        return weights

    def set(self, weights: torch.Tensor, layer_weights: dict[str, torch.Tensor] | None = None) -> None:
        """Replace the weights: ``[slots]`` (one row for every batch row) or ``[rows, slots]``.

        ``layer_weights`` optionally gives some layer groups (see ``runtime.layer_group``) their own weights;
        groups not named read ``weights``. Passing the same values again costs nothing.
        """
        weights = self._rows(weights)
        layers = {g: self._rows(w) for g, w in (layer_weights or {}).items()}
        same = weights.shape == self.weights.shape and torch.equal(weights, self.weights)
        same = same and layers.keys() == self.layer_weights.keys()
        if same and all(torch.equal(w, self.layer_weights[g]) for g, w in layers.items()):
            return
        self.weights = weights.clone()
        self.layer_weights = {g: w.clone() for g, w in layers.items()}
        self.version += 1

    def set_slot(self, slot: int, value: float) -> None:
        self.weights[:, slot] = float(value)
        for w in self.layer_weights.values():
            w[:, slot] = float(value)
        self.version += 1

    def set_enabled(self, enabled: bool) -> None:
        if enabled != self.enabled:
            self.enabled = enabled
            self.version += 1

    @property
    def is_uniform(self) -> bool:
        """True when every row carries the same weights (the only case that can be fused)."""
        return all(bool((w == w[:1]).all()) for w in [self.weights, *self.layer_weights.values()])
