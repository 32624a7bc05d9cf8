"""Parsed adapters kept in host memory, keyed by the file's content hash, least recently used out first.

Parsing a LoRA file (reading, converting kohya keys, checking shapes) costs far more than attaching it; a
server that keeps swapping adapters in and out of the model reads each file once. Two files with the same
bytes share one entry; a file changed on disk gets a new hash, so a stale parse is never served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

from lora_composer.adapters import load_adapter
from lora_composer.adapters.types import Adapter


def adapter_bytes(adapter: Adapter) -> int:
    """Host memory held by ``adapter``'s tensors."""
    total = 0
    for delta in adapter.deltas.values():
        total += sum(t.numel() * t.element_size() for t in delta.tensors().values())
    return total


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AdapterCache:
    """``load(path, name=, allow_pickle=)``: :func:`~lora_composer.adapters.load_adapter` through an LRU of at most
    ``max_bytes`` of parsed tensors (an adapter larger than the whole cap is parsed but not kept)."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()  # sha256 -> (adapter, bytes)
        self._hashes: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0

    def sha256(self, path: Path) -> str:
        """The file's sha256, computed once per (path, size, mtime)."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        digest = self._hashes.get(key)
        if digest is None:
            digest = self._hashes[key] = file_sha256(path)
        return digest

    def load(self, path, name: str | None = None, allow_pickle: bool = False) -> Adapter:
        path = Path(os.fspath(path)).resolve()
        if path.is_dir():  # a PEFT folder: no single file to hash
            return load_adapter(path, name=name, allow_pickle=allow_pickle)
        digest = self.sha256(path)
        with self._lock:
            hit = self._entries.get(digest)
            if hit is not None:
                self._entries.move_to_end(digest)
                self.hits += 1
        if hit is not None:
            return dataclasses.replace(hit[0], name=name or path.stem, path=str(path))
        adapter = load_adapter(path, name=name, allow_pickle=allow_pickle)
        size = adapter_bytes(adapter)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes and digest not in self._entries:
                self._entries[digest] = (adapter, size)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, (_, freed) = self._entries.popitem(last=False)
                    self.bytes -= freed
                    self.evictions += 1
        return adapter

    def __len__(self) -> int:
        return len(self._entries)
