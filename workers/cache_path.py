"""The cache's CPU work of a node, batched off the request and device threads (issue 26).

At saturation every request's cache work used to run on its own thread, one at a time: a prompt
embedding, a Qdrant search (qdrant-edge holds the interpreter lock while it searches), a state
conversion and an upsert per captured state. They competed with the device threads for the cores and
the interpreter lock. Here the same work runs as the device path does, in batches, on two threads of
its own:

- **The lookup stage** (``reprise-cache-lookup-batch``): every request waiting for its approximate
  lookup is taken at once: one embedder call for all their prompts (MiniLM in one forward pass, on
  ``embed_threads`` torch threads), one batched search (``EdgeShard.query_batch``), then the state of
  each hit. A request whose device already reached the step its lookup could resume at (it is held
  there, its batch slot idle, ``passed()``) stops waiting for its lookup: it runs on fresh, the skip is
  counted (``lookup_skipped``), the batch leaves it out or its late answer is dropped, and the writer
  embeds its prompt if it needs a write-back. A late lookup thus costs its request a hit, never the
  device a slot for longer than one poll (``POLL_S``).
- **The writer** (``reprise-cache-writer``): write-backs queue here, bounded by
  ``REPRISE_WRITEBACK_QUEUE``; a full queue drops the new one (``writeback_dropped``) instead of
  delaying anyone. It takes every queued write-back at once, embeds the prompts the lookup stage did
  not, and stores them in one insert-only upsert (``LatentCache.write_back_many``).

Neither thread ever runs on a device thread; the device threads only step and decode.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger("reprise.worker")


@dataclass
class Lookup:
    """One request's approximate lookup, waiting for the next batch."""

    key: Any  # cache.CacheKey
    prompt: str
    allow_shared: bool
    passed: Callable[[], bool]  # True once the request no longer benefits from a hit (held at its step)
    future: Future = field(default_factory=Future)  # -> (vector or None, cache.ApproxHit or None)
    abandoned: bool = False  # its request went on without it (skipped): the batch leaves it out


@dataclass
class WriteBack:
    key: Any
    vector: np.ndarray | None  # None: the writer embeds the prompt
    states: dict[int, np.ndarray]
    uri: str
    shareable: bool


_STOP = object()
POLL_S = 0.02  # how often a request waiting for its lookup checks whether its device already holds it


class CachePath:
    """The batched lookup stage and the write-back writer of one node's cache (module docstring)."""

    def __init__(
        self,
        cache_of: Callable[[], Any],
        counters: dict[str, int],
        writeback_queue: int = 64,
        batch_max: int = 64,
        embed_threads: int = 1,
        wait_s: float = 30.0,
        nice: int = 10,
    ):
        # ``cache_of()``: the service's cache now (a node may reopen it; None while it is away)
        self.cache_of, self.counters = cache_of, counters
        self.batch_max, self.embed_threads, self.wait_s, self.nice = batch_max, embed_threads, wait_s, nice
        for name in ("writeback_dropped", "writeback_failed", "writeback_written", "lookup_skipped", "lookup_batches"):
            counters.setdefault(name, 0)
        self._count_lock = threading.Lock()
        self._lookups: queue.Queue = queue.Queue()
        self._writes: queue.Queue = queue.Queue(maxsize=writeback_queue)
        self._pending_writes = 0  # queued or being written: drain() waits for zero
        self._idle = threading.Condition()
        self._threads = [
            threading.Thread(target=self._lookup_loop, name="reprise-cache-lookup-batch", daemon=True),
            threading.Thread(target=self._write_loop, name="reprise-cache-writer", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[name] = self.counters.get(name, 0) + n

    # --- the lookup stage ----------------------------------------------------------------------------
    def lookup(self, key, prompt: str, allow_shared: bool, passed=lambda: False):
        """(vector or None, ApproxHit or None) of one request, from the next batch; the caller waits."""
        item = Lookup(key, prompt, allow_shared, passed)
        self._lookups.put(item)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                return item.future.result(timeout=POLL_S)
            except TimeoutError:
                if passed():  # held at its resume step: a later answer would only keep it waiting
                    self._abandon(item)
                    return None, None
                if time.monotonic() > deadline:
                    item.abandoned = True
                    self._count("lookup_timeout")
                    log.warning("approximate lookup not answered within %.0f s; generating fresh", self.wait_s)
                    return None, None

    def _abandon(self, item: Lookup) -> None:
        """Mark a lookup skipped, counted once whichever thread (its request's or the batch's) sees it first."""
        with self._count_lock:
            if not item.abandoned:
                item.abandoned = True
                self.counters["lookup_skipped"] = self.counters.get("lookup_skipped", 0) + 1

    def _take(self, q: queue.Queue, first) -> tuple[list, bool]:
        """``first`` and everything queued behind it (up to batch_max); whether a stop was among them."""
        items, stop = [first], first is _STOP
        while len(items) < self.batch_max:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            stop = stop or item is _STOP
        return [i for i in items if i is not _STOP], stop

    def _background(self) -> None:
        """This thread's share of the machine: ``embed_threads`` torch threads for its kernels, and a lower
        CPU priority (Linux: nice is per thread) so that its work takes the cores the devices leave idle."""
        torch.set_num_threads(self.embed_threads)
        if self.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except (AttributeError, OSError) as exc:  # not Linux, or not permitted: full priority
                log.debug("cannot lower the cache thread's priority: %s", exc)

    def _lookup_loop(self) -> None:
        self._background()
        while True:
            items, stop = self._take(self._lookups, self._lookups.get())
            if items:
                self._lookup_batch(items)
            if stop:
                return

    def _lookup_batch(self, items: list[Lookup]) -> None:
        live = []
        for item in items:
            if item.abandoned:  # counted by its request, which went on without it
                continue
            if item.passed():
                self._abandon(item)
                item.future.set_result((None, None))
            else:
                live.append(item)
        cache = self.cache_of()
        if not live or cache is None:
            for item in live:
                item.future.set_result((None, None))
            return
        try:
            vectors = cache.embedder.embed_many([i.prompt for i in live])
            hits = cache.lookup_approx_many([(i.key, v, i.allow_shared) for i, v in zip(live, vectors)])
            self._count("lookup_batches")
            for item, vector, hit in zip(live, vectors, hits):
                item.future.set_result((vector, hit))
        except BaseException as exc:  # every waiter gets the error, none hangs
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)

    # --- the writer ----------------------------------------------------------------------------------
    def write_back(self, key, vector, captured: dict, uri: str, shareable: bool) -> bool:
        """Queue the states captured by a request (tensors; converted here, where torch releases the lock);
        False when the writer is behind and the write-back was dropped (counted)."""
        states = {k: v[0].float().cpu().numpy() for k, v in captured.items()}
        with self._idle:
            try:
                self._writes.put_nowait(WriteBack(key, vector, states, uri, shareable))
            except queue.Full:
                self._count("writeback_dropped")
                log.warning("write-back queue full: dropping the states of %s", key.prompt[:40])
                return False
            self._pending_writes += 1
        return True

    def _write_loop(self) -> None:
        self._background()
        while True:
            items, stop = self._take(self._writes, self._writes.get())
            if items:
                try:
                    self._write_batch(items)
                except Exception:  # a failed write-back never fails a job
                    self._count("writeback_failed", len(items))
                    log.exception("cache write-back of %d entries failed", len(items))
                finally:
                    with self._idle:
                        self._pending_writes -= len(items)
                        self._idle.notify_all()
            if stop:
                return

    def _write_batch(self, items: list[WriteBack]) -> None:
        cache = self.cache_of()
        if cache is None:
            self._count("writeback_failed", len(items))
            return
        missing = [w for w in items if w.vector is None]
        if missing:
            for w, v in zip(missing, cache.embedder.embed_many([w.key.prompt for w in missing])):
                w.vector = v
        stored = cache.write_back_many([(w.key, w.vector, w.states, w.uri, w.shareable) for w in items])
        self._count("writeback_written", sum(stored))
        self._count("writeback_failed", len(stored) - sum(stored))

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every write-back queued so far has landed or failed."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending_writes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._pending_writes} cache write-backs still pending after {timeout:.0f} s")
                self._idle.wait(left)

    def close(self, timeout: float = 30.0) -> None:
        self._lookups.put(_STOP)
        try:
            self._writes.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("cache writer still full at shutdown")
        for t in self._threads:
            t.join(timeout)
