"""Text-encoder memoisation: the encoder's output is a pure function of (model version, prompt)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch


def nbytes(value: Any) -> int:
    """Bytes held by a memo entry: a tensor, or a family's ``Conditioning`` (its tensors)."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    return sum(nbytes(t) for t in getattr(value, "tensors", {}).values())


class TextEmbeddingMemo:
    """A bounded, thread-safe LRU of prompt embeddings keyed by (model fingerprint, text).

    Shared by a node's devices. Bounded twice: by entries and by the bytes of their tensors (a Flux T5
    state is about 4 MB, so an entry bound alone lets 1,024 of them hold 4 GB of device memory). Tensors
    go in and come out as clones, so a caller that edits its embeddings in place cannot change what the
    next request gets.
    """

    # OrderedDict rather than functools.lru_cache: entries are put after an encode elsewhere, not computed here.
    def __init__(self, max_entries: int = 1024, max_bytes: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (or None for no byte bound), got {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, model_fingerprint: str, text: str) -> torch.Tensor | None:
        key = (model_fingerprint, text)
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return tensor.clone()

    def put(self, model_fingerprint: str, text: str, tensor: torch.Tensor) -> None:
        stored = tensor.detach().clone()
        size = nbytes(stored)
        key = (model_fingerprint, text)
        with self._lock:
            if self.max_bytes is not None and size > self.max_bytes:
                return  # larger than the whole memo: not kept
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= nbytes(previous)
            self._entries[key] = stored
            self._bytes += size
            while len(self._entries) > self.max_entries or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= nbytes(dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = 0
            self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "max_entries": self.max_entries,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
