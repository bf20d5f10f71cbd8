"""Text-encoder memoisation: the encoder's output is a pure function of (model version, prompt)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class TextEmbeddingMemo:
    """A bounded, thread-safe LRU of prompt embeddings keyed by (model fingerprint, text).

    Shared by a node's devices. Tensors go in and come out as clones, so a caller that edits its
    embeddings in place cannot change what the next request gets.
    """

    # OrderedDict rather than functools.lru_cache: entries are put after an encode elsewhere, not computed here.
    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
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
        with self._lock:
            self._entries[(model_fingerprint, text)] = stored
            self._entries.move_to_end((model_fingerprint, text))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = 0
            self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "max_entries": self.max_entries,
                "hits": self.hits,
                "misses": self.misses,
            }
