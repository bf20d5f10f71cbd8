"""The cache's CPU work of a node, batched off the request and device threads (issue 26).

At saturation every request's cache work used to run on its own thread, one at a time: a prompt
embedding, a Qdrant search (qdrant-edge holds the interpreter lock while it searches), a state
conversion and an upsert per captured state. They competed with the device threads for the cores and
the interpreter lock. Here the same work runs as the device path does, in batches, on two threads of
its own:

- **The lookup stage** (``reprise-cache-lookup-batch``): every request waiting for its approximate
  lookup is taken at once. Those that no stored entry could match (``LatentCache.could_resume_many``: one
  count per distinct filter) are answered at once, unembedded (``lookup_empty``); their prompts are embedded
  ahead once no lookup has come for ``AHEAD_IDLE_S``, a few at a time, into the embedder's memo where their
  write-backs find them. The rest are
  answered in chunks of ``ANSWER_CHUNK``, the longest waiting first: one
  embedder call for a chunk's prompts (on a node of accelerators or ``sim``, MiniLM in a child process of
  its own, so its many small torch calls neither wait for nor hold this process's interpreter lock:
  REPRISE_CACHE_EMBED_PROCESS, cache/embedding.py), one batched search (``EdgeShard.query_batch``), then
  the state of each hit; each request's answer goes to its ``answered`` callback (which resolves it in
  the engine), so no request thread waits or polls. A lookup whose request no longer waits for it
  (``passed()``: the engine held it at its earliest resume step for the lookup's time box,
  REPRISE_CACHE_LOOKUP_TIMEOUT_MS, and then ran it on fresh) is not looked up: the skip is counted
  (``lookup_skipped``) and the writer embeds its prompt if it needs a write-back. The engine's hold is the one time box of a lookup, and a
  held request leaves its batch slot to another meanwhile, so a late lookup costs its request a hit and
  some latency, never its device a call's slot.
- **The writer** (``reprise-cache-writer``): write-backs queue here, bounded by
  ``REPRISE_WRITEBACK_QUEUE``; a full queue drops the new one (``writeback_dropped``) instead of
  delaying anyone. It takes every queued write-back at once, embeds the prompts the lookup stage did
  not in one embedder call, and stores them entry by entry (insert-only), each in a moment when every
  device thread waits inside its call (``when_quiet``, NodeEngine.wait_quiet; at most QUIET_WAIT_S): an entry
  holds the interpreter lock for milliseconds, and a device thread that comes back from its call meanwhile
  waits to step its requests, which below saturation cost 2 % of throughput (docs/measured.md). A node with
  a ``cpu`` device passes no ``when_quiet`` (GenerationService.host_computes): its calls want the lock and the
  cores throughout, so its entries are stored at once.

Neither thread ever runs on a device thread; the device threads only step and decode.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from cache.embedding import ENCODE_BATCH
from workers.approx_gate import ApproxGate

log = logging.getLogger("reprise.worker")


@dataclass
class Lookup:
    """One request's approximate lookup, waiting for the next batch."""

    key: Any  # cache.CacheKey
    prompt: str
    allow_shared: bool
    passed: Callable[[], bool]  # True once the request no longer waits for the answer (ran on fresh)
    answered: Callable[[Any, Any], None]  # (vector or None, cache.ApproxHit or None), on the lookup thread
    queued_at: float = 0.0  # time.monotonic() of submit


@dataclass
class WriteBack:
    key: Any
    vector: np.ndarray | None  # None: the writer embeds the prompt, if ``embed``
    states: dict[int, np.ndarray]
    uri: str
    shareable: bool
    embed: bool = True  # False: stored without a prompt vector (the gate was closed for its lookup)


_STOP = object()
ANSWER_CHUNK = 8  # lookups embedded, searched and answered together (CachePath._lookup_batch)
AHEAD_MAX = 256  # prompts answered unembedded kept to embed ahead (CachePath._embed_ahead)
# Embedding ahead waits until no lookup came for AHEAD_IDLE_S, then takes AHEAD_PIECE prompts (one MiniLM
# forward) at a time: a burst's lookups trickle in over the admissions of a
# whole wave, and each would otherwise wait behind the last one's prompts being embedded (up to 165 ms for
# lookups that need no embedding at all, docs/measured.md, ninth round).
AHEAD_IDLE_S = 0.05
AHEAD_PIECE = ENCODE_BATCH
OFFLINE_RETRY_S = 30.0  # how long the writer tries a store that is offline (optimising) again (_write_batch)
OFFLINE_RETRY_PAUSE_S = 0.25
# The writer stores each entry in a moment when every device thread is inside its call (``when_quiet``): an entry
# holds the interpreter lock for milliseconds (qdrant-edge's binding converts it under the lock), and a device
# thread coming back from its call then waits to step its requests. Never longer than QUIET_WAIT_S an entry.
QUIET_WAIT_S = 0.1
QUIET_MARGIN_MIN_S = 0.002

# The node's cache-path counters (``celery inspect stats`` → reprise.jobs; `reprise bench cache` prints them).
# lookup_wait/embed/search_ms are sums over looked-up requests: the wait in the queue before their batch started, and
# their batch's embedding and search (state fetch included), so their means say where a lookup's time goes.
COUNTERS = (
    "writeback_dropped",
    "writeback_failed",  # an error: the store refused or was away
    "writeback_raced",  # another node or job stored the same entry first (insert-only: first writer wins)
    "writeback_retried",  # write-backs tried again because the store was offline (optimising) at the time
    "writeback_written",
    "writeback_wait_ms",  # the writer's waits for a moment when the devices compute (CachePath._when_quiet)
    "lookup_skipped",
    "lookup_gated",  # not made: this node's approximate lookups did not pay (workers/approx_gate.py)
    "lookup_empty",  # answered at once: no stored entry matched their filter, so no embedding was waited for
    "lookup_batches",
    "lookups",
    "lookup_wait_ms",
    "lookup_embed_ms",
    "lookup_search_ms",
    "lookup_holds",  # requests their device held at the resume step for their lookup (note_hold)
    "lookup_held_ms",
    "exact_lookups",  # the cache's part of a request before its device (invalidation catch-up, generation, exact
    "exact_lookup_ms",  # lookup), on the request's thread: note_exact
)


class CachePath:
    """The batched lookup stage and the write-back writer of one node's cache (module docstring)."""

    def __init__(
        self,
        cache_of: Callable[[], Any],
        counters: dict[str, int],
        writeback_queue: int = 64,
        batch_max: int = 64,
        embed_threads: int = 1,
        nice: int = 10,
        gate: ApproxGate | None = None,
        when_quiet: Callable[[float, float], bool] | None = None,
    ):
        # ``cache_of()``: the service's cache now (a node may reopen it; None while it is away)
        self.cache_of, self.counters = cache_of, counters
        # ``when_quiet(margin_s, timeout_s)``: returns once no device thread wants the interpreter lock within
        # margin_s, or after timeout_s (NodeEngine.wait_quiet)
        self.when_quiet = when_quiet
        self._entry_s = QUIET_MARGIN_MIN_S  # how long the last entry's write took: the margin the writer asks for
        self.gate = gate or ApproxGate(enabled=False)
        self.batch_max, self.embed_threads, self.nice = batch_max, embed_threads, nice
        for name in COUNTERS:
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
    def submit(self, key, prompt: str, allow_shared: bool, passed, answered) -> None:
        """Queue one request's approximate lookup for the next batch; ``answered(vector, hit)`` gets the
        answer on the lookup thread ((None, None) for a skip or a failure: the request runs fresh)."""
        self._lookups.put(Lookup(key, prompt, allow_shared, passed, answered, time.monotonic()))

    def lookup(self, key, prompt: str, allow_shared: bool, passed=lambda: False):
        """``submit`` and wait: (vector or None, ApproxHit or None)."""
        future: Future = Future()
        self.submit(key, prompt, allow_shared, passed, lambda vector, hit: future.set_result((vector, hit)))
        return future.result()

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

    def _background(self, nice: int = 0) -> None:
        """This thread's share of the machine: ``embed_threads`` torch threads for its kernels, and for the
        writer, whose work waits for nobody, a lower CPU priority (Linux: nice is per thread) so that it
        takes the cores the devices leave idle. The lookup thread keeps its priority: requests wait on it."""
        torch.set_num_threads(self.embed_threads)
        if nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except (AttributeError, OSError) as exc:  # not Linux, or not permitted: full priority
                log.debug("cannot lower the cache thread's priority: %s", exc)

    def _lookup_loop(self) -> None:
        self._background()
        later: list[str] = []  # prompts answered unembedded, to embed once lookups pause (AHEAD_IDLE_S)
        while True:
            try:
                first = self._lookups.get(timeout=AHEAD_IDLE_S if later else None)
            except queue.Empty:
                self._embed_ahead(later[:AHEAD_PIECE])
                del later[:AHEAD_PIECE]
                continue
            items, stop = self._take(self._lookups, first)
            if items:
                self.gate.note_lookups(len(items))
                t0 = time.monotonic()
                later.extend(self._lookup_batch(items))
                self.gate.note_cost(time.monotonic() - t0)
                del later[:-AHEAD_MAX]  # a node never idle: the writer embeds the oldest ones itself
            if stop:
                return

    def _embed_ahead(self, prompts: list[str]) -> None:
        """Embed prompts whose lookups were answered without it, into the embedder's memo, where their
        write-backs find them: else the writer embeds a whole wave of them when the wave's requests finish
        together, just when the next wave's lookups need the embedder."""
        cache = self.cache_of()
        if cache is None or not prompts:
            return
        t0 = time.monotonic()
        try:
            cache.embedder.embed_many(prompts)
            self.gate.note_cost(time.monotonic() - t0)
        except Exception as exc:  # the writer embeds them then
            log.debug("embedding %d prompts ahead failed: %s", len(prompts), exc)

    @staticmethod
    def _answer(item: Lookup, vector, hit) -> None:
        try:
            item.answered(vector, hit)
        except Exception:  # one request's callback never stops the others' answers
            log.exception("cache lookup answer failed")

    def _lookup_batch(self, items: list[Lookup]) -> list[str]:
        # First the requests that nothing stored could serve (a cold cache, or a size, step count or guidance
        # no entry has): one count per distinct filter answers them at once, without their embedding (their
        # prompts are embedded later, for their write-backs). Then the rest, in chunks, the longest waiting
        # first, so that in a burst (every client of a full node at once) the first answers come after one
        # chunk's embedding rather than after the whole burst's.
        # Returns the prompts answered unembedded: the loop embeds them once no lookup waits.
        items, unembedded = self._answer_unmatchable(items)
        for start in range(0, len(items), ANSWER_CHUNK):
            self._lookup_chunk(items[start : start + ANSWER_CHUNK])
        return unembedded

    def _answer_unmatchable(self, items: list[Lookup]) -> tuple[list[Lookup], list[str]]:
        """Answer (None, None) at once to the lookups whose filter no stored entry matches (``lookup_empty``):
        (the others, to look up; the prompts of the answered ones)."""
        cache = self.cache_of()
        if cache is None or not items:
            return items, []
        try:
            could = cache.could_resume_many([(i.key, i.allow_shared) for i in items])
        except Exception:  # the lookups decide, as without the check
            log.exception("cache pre-check of %d lookups failed; looking them up", len(items))
            return items, []
        rest, answered = [], []
        for item, possible in zip(items, could):
            if possible:
                rest.append(item)
            else:
                self._count("lookup_empty")
                self._answer(item, None, None)
                answered.append(item.prompt)
        return rest, answered

    def _lookup_chunk(self, items: list[Lookup]) -> None:
        live = []
        for item in items:
            if item.passed():
                self._count("lookup_skipped")
                self._answer(item, None, None)
            else:
                live.append(item)
        cache = self.cache_of()
        answers: list = [(None, None)] * len(live)
        try:
            if live and cache is not None:
                t0 = time.monotonic()
                vectors = cache.embedder.embed_many([i.prompt for i in live])
                t1 = time.monotonic()
                hits = cache.lookup_approx_many([(i.key, v, i.allow_shared) for i, v in zip(live, vectors)])
                t2 = time.monotonic()
                answers = list(zip(vectors, hits))
                self._count("lookup_batches")
                self._count("lookups", len(live))
                self._count("lookup_wait_ms", round(sum(t0 - i.queued_at for i in live) * 1000))
                self._count("lookup_embed_ms", round((t1 - t0) * 1000 * len(live)))
                self._count("lookup_search_ms", round((t2 - t1) * 1000 * len(live)))
        except Exception:  # the cache is an optimisation: every request of the batch runs fresh
            self._count("lookup_failed", len(live))
            log.exception("cache lookup batch of %d failed; generating fresh", len(live))
        for item, (vector, hit) in zip(live, answers):
            self._answer(item, vector, hit)

    def note_hold(self, held_s: float) -> None:
        """A request was held at its resume step for ``held_s`` waiting for its lookup (its device's
        call went on without it)."""
        self._count("lookup_holds")
        self._count("lookup_held_ms", round(held_s * 1000))

    def note_gated(self) -> None:
        """A request's approximate lookup was not made: the node's lookups do not pay (workers/approx_gate.py)."""
        self._count("lookup_gated")

    def note_exact(self, seconds: float) -> None:
        """A request spent ``seconds`` in the cache before its device: rules, generation, exact lookup."""
        self._count("exact_lookups")
        self._count("exact_lookup_ms", round(seconds * 1000))

    # --- the writer ----------------------------------------------------------------------------------
    def write_back(self, key, vector, captured: dict, uri: str, shareable: bool, embed: bool = True) -> bool:
        """Queue the states captured by a request (tensors; converted here, where torch releases the lock);
        False when the writer is behind and the write-back was dropped (counted). ``embed=False`` with no
        ``vector``: stored without a prompt vector (its lookup was gated, so nothing embeds its prompt)."""
        states = {k: v[0].float().cpu().numpy() for k, v in captured.items()}
        with self._idle:
            try:
                self._writes.put_nowait(WriteBack(key, vector, states, uri, shareable, embed))
            except queue.Full:
                self._count("writeback_dropped")
                log.warning("write-back queue full: dropping the states of %s", key.prompt[:40])
                return False
            self._pending_writes += 1
        return True

    def _write_loop(self) -> None:
        self._background(self.nice)
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
        missing = [w for w in items if w.vector is None and w.embed]
        if missing:
            t0 = time.monotonic()
            for w, v in zip(missing, cache.embedder.embed_many([w.key.prompt for w in missing])):
                w.vector = v
            self.gate.note_cost(time.monotonic() - t0)  # the approximate tier's cost, as a lookup's
        for w in items:
            self.gate.note_write(w.vector is not None)
        # A store closed for its optimiser (a few seconds after every REPRISE_CACHE_OPTIMIZE_AFTER_WRITES writes)
        # is tried again until it is back, for OFFLINE_RETRY_S at most; write-backs queued meanwhile wait in
        # the bounded queue as behind any slow write.
        deadline = time.monotonic() + OFFLINE_RETRY_S
        while True:
            outcomes = [self._write_one(cache, w) for w in items]
            for outcome, counter in (
                ("stored", "writeback_written"),
                ("raced", "writeback_raced"),
                ("failed", "writeback_failed"),
            ):
                self._count(counter, outcomes.count(outcome))
            items = [w for w, outcome in zip(items, outcomes) if outcome == "offline"]
            if not items:
                return
            if time.monotonic() >= deadline or (cache := self.cache_of()) is None:
                self._count("writeback_failed", len(items))
                log.warning("cache still offline: %d write-backs not stored", len(items))
                return
            self._count("writeback_retried", len(items))
            time.sleep(OFFLINE_RETRY_PAUSE_S)

    def _write_one(self, cache, w: WriteBack) -> str:
        """One entry's write, in a moment when the devices compute (its outcome, as write_back_outcomes)."""
        self._when_quiet()
        t0 = time.monotonic()
        outcome = cache.write_back_outcomes([(w.key, w.vector, w.states, w.uri, w.shareable)])[0]
        self._entry_s = max(QUIET_MARGIN_MIN_S, time.monotonic() - t0)
        return outcome

    def _when_quiet(self) -> None:
        """Wait until no device thread will want the interpreter lock for about one entry's write, or
        QUIET_WAIT_S (a write-back is never held back longer: the queue behind it is bounded)."""
        if self.when_quiet is None:
            return
        t0 = time.monotonic()
        self.when_quiet(self._entry_s, QUIET_WAIT_S)
        self._count("writeback_wait_ms", round((time.monotonic() - t0) * 1000))

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
