"""Which adapters stay attached to the model: least recently used out first, under a memory budget.

Attached adapters cost nothing when their weight is 0 (the runtime skips them), so the server keeps them
attached between requests and only detaches the least recently used ones, never one a running request
uses, once their factors exceed ``max_bytes`` or their number ``max_adapters``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

from lora_composer.serving.adapter_cache import adapter_bytes


class Residency:
    """``acquire(paths)`` attaches (or reuses) and pins adapters; ``release(names)`` unpins them."""

    def __init__(self, composer, max_bytes: int = 1 << 30, max_adapters: int = 64):
        self.composer = composer
        self.max_bytes = int(max_bytes)
        self.max_adapters = int(max_adapters)
        self._lru: OrderedDict[str, int] = OrderedDict()  # attached name -> bytes, least recent first
        self._pins: Counter[str] = Counter()
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return sum(self._lru.values())

    def acquire(self, paths: list[Path], allow_pickle: bool = False) -> list[str]:
        """Attach every file of ``paths`` (all or none) and pin them; returns their names in the runtime."""
        names = []
        try:
            for path in paths:
                adapter = self.composer.load_lora(str(path), allow_pickle=allow_pickle)
                if adapter.name not in self._lru:
                    self._lru[adapter.name] = adapter_bytes(adapter)
                self._lru.move_to_end(adapter.name)
                self._pins[adapter.name] += 1
                names.append(adapter.name)
        except BaseException:
            self.release(names)
            raise
        self._evict()
        return names

    def release(self, names: list[str]) -> None:
        for name in names:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]
        self._evict()

    def _evict(self) -> None:
        for name in list(self._lru):
            if self.bytes <= self.max_bytes and len(self._lru) <= self.max_adapters:
                return
            if self._pins[name] or name not in self.composer.runtime.adapters:
                if name not in self.composer.runtime.adapters:
                    del self._lru[name]
                continue
            self.composer.unload_lora(name)
            del self._lru[name]
            self.evictions += 1

    def attached(self) -> list[str]:
        return list(self._lru)
