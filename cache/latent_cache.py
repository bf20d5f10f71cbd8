"""The latent cache the worker talks to: exact hits, approximate (NIRVANA) hits, write-back,
expiry and eviction, over one LatentStore.

Lookups are time-boxed and never raise: Qdrant down, slow or corrupt means a miss, a log line
and a count in `cache.health`, so the job is generated fresh. Writes never raise either.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from cache.embedding import CallableEmbedder, Embedder, PromptEmbedder, minilm_dtype
from cache.keys import CacheKey
from cache.open_store import open_store
from cache.policies import EntryStats, make_policy, plan_eviction
from cache.settings import CacheSettings
from cache.skip_table import choose_k, state_steps, validate_table
from cache.store import (
    STATE_CHUNK,
    CacheUnavailableError,
    Cond,
    LatentStore,
    Where,
    rows_to_state,
    state_to_rows,
)

log = logging.getLogger("reprise.cache")

PAYLOAD_OVERHEAD_BYTES = 1024  # rough size of one entry's payload and its index postings
# `audience` is the tenant, or "*" when shareable: "own or shared" becomes one keyword match.
# (qdrant-edge-py 0.9 turns MatchValue(True) into the integer 1, so a bool filter on
# `shareable` never matches there; keyword matching works on every backend.)
SHARED_AUDIENCE = "*"
_EVICTION_FIELDS = ["ks_present", "state_shape", "state_slots", "checksums", "created_at", "hits", "last_hit_at"]


@dataclass(frozen=True)
class ExactHit:
    entry_id: str
    image_uri: str
    tenant: str


@dataclass(frozen=True)
class ApproxHit:
    entry_id: str
    similarity: float
    k: int
    state: np.ndarray  # float32, the stored shape
    source_prompt: str


def state_checksum(state: np.ndarray) -> str:
    """sha256 of the state's float16 bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(state, dtype=np.float16).tobytes()).hexdigest()


class HitCounter:
    """Hit counts per (entry, K) and last-hit time: Redis hashes `<prefix>:hits:{entry_id}`.

    Qdrant has no atomic increment, so counters live in Redis (HINCRBY); eviction reads them, and
    `LatentCache.fold_counters` (the coordinator's `fold` duty) copies them into the payloads, where
    they outlive the counters. Without Redis they are counted in this process, which is exact for the
    embedded mode where one process owns the cache (until it restarts: then the folded payloads remain). `prefix` is the cluster's
    REPRISE_QUEUE_PREFIX, so that two clusters sharing one Redis never mix their counts.
    """

    def __init__(self, redis=None, prefix: str = "reprise") -> None:
        self.key_prefix = f"{prefix}:hits:"
        self._redis = redis
        self._local: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def incr(self, entry_id: str, k: int, now: float) -> None:
        if self._redis is not None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hincrby(self.key_prefix + entry_id, str(int(k)), 1)
            pipe.hset(self.key_prefix + entry_id, "last_hit_at", repr(float(now)))
            pipe.execute()
            return
        with self._lock:
            row = self._local.setdefault(entry_id, {})
            row[str(int(k))] = row.get(str(int(k)), 0) + 1
            row["last_hit_at"] = float(now)

    def get_many(self, entry_ids: list[str]) -> dict[str, tuple[dict[int, int], float | None]]:
        if self._redis is not None:
            pipe = self._redis.pipeline(transaction=False)
            for entry_id in entry_ids:
                pipe.hgetall(self.key_prefix + entry_id)
            rows = [{_s(k): _s(v) for k, v in (row or {}).items()} for row in pipe.execute()]
        else:
            with self._lock:
                rows = [dict(self._local.get(e, {})) for e in entry_ids]
        out = {}
        for entry_id, row in zip(entry_ids, rows):
            last = row.pop("last_hit_at", None)
            out[entry_id] = ({int(k): int(v) for k, v in row.items()}, float(last) if last is not None else None)
        return out

    def forget(self, entry_ids: Iterable[str]) -> None:
        entry_ids = list(entry_ids)
        if not entry_ids:
            return
        if self._redis is not None:
            self._redis.delete(*[self.key_prefix + e for e in entry_ids])
            return
        with self._lock:
            for e in entry_ids:
                self._local.pop(e, None)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def merge_hits(
    payload: dict, counted: dict[int, int], last_counted: float | None
) -> tuple[dict[int, int], float | None]:
    """An entry's hits per K and last hit: the folded payload's and the live counters', the larger of each.

    Counts only grow, so the larger is the better estimate when the counters were lost and restarted
    (a lower bound then); it also makes a fold idempotent. An unreadable payload value counts as none.
    """
    hits: dict[int, int] = {}
    stored = payload.get("hits")
    for k, n in stored.items() if isinstance(stored, dict) else ():
        try:
            hits[int(k)] = max(hits.get(int(k), 0), int(n))
        except (TypeError, ValueError):
            continue
    for k, n in counted.items():
        hits[k] = max(hits.get(k, 0), int(n))
    lasts = [float(t) for t in (payload.get("last_hit_at"), last_counted) if isinstance(t, (int, float))]
    # To the millisecond: the store may give a float back one unit in the last place off what was written
    # (seen on the embedded store: ...516.9040163 stored, ...516.9040165 read back, and at times below it),
    # and a stored time read back below the counter's made every fold rewrite it, forever. A time of 13
    # significant digits reads back exactly.
    return hits, round(max(lasts), 3) if lasts else None


class _BackgroundOptimizer:
    """Runs store.optimize() after N writes or every interval with writes pending, off the lookup path."""

    def __init__(self, store: LatentStore, after_writes: int, interval_s: float, health: Counter) -> None:
        self._store = store
        self._after = after_writes
        self._interval = interval_s
        self._health = health
        self._pending = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.runs = 0
        self._thread = threading.Thread(target=self._loop, name="reprise-cache-optimize", daemon=True)
        self._thread.start()

    def note_write(self) -> None:
        with self._lock:
            self._pending += 1
            if self._pending >= self._after:
                self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                pending, self._pending = self._pending, 0
            if pending:
                self.run_now()

    def run_now(self) -> float:
        start = time.perf_counter()
        try:
            self._store.optimize()
            self.runs += 1
        except Exception:
            self._health["optimize_error"] += 1
            log.exception("cache optimize failed")
        return time.perf_counter() - start

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=1.0)
        if self._thread.is_alive():  # the shard cannot close under a running optimisation
            log.info("waiting for the cache optimiser to finish before closing")
            self._thread.join()


class LatentCache:
    """Exact and approximate lookups, write-back, expiry and eviction over a LatentStore."""

    def __init__(
        self,
        settings: CacheSettings,
        store: LatentStore,
        embedder: Embedder,
        redis=None,
        clock: Callable[[], float] = time.time,
        key_prefix: str = "reprise",
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.clock = clock
        self.hits = HitCounter(redis, key_prefix)
        self.health: Counter = Counter()
        self._table = settings.table()
        self._timeout_s = settings.lookup_timeout_ms / 1000.0
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reprise-cache-lookup")
        self._optimizer = (
            _BackgroundOptimizer(store, settings.optimize_after_writes, settings.optimize_interval_s, self.health)
            if store.backend == "edge"
            else None
        )

    @classmethod
    def open(
        cls,
        settings: CacheSettings | None = None,
        redis=None,
        embedder: Embedder | Callable | None = None,
        clock: Callable[[], float] = time.time,
        key_prefix: str = "reprise",
    ) -> "LatentCache":
        """Open (or create) the cache. For the clip embedder pass `embedder`: an Embedder, or a
        callable prompt -> pooled text embedding (wrapped with version "clip", settings.clip_dim).
        `key_prefix` starts every Redis key the cache writes (the cluster's REPRISE_QUEUE_PREFIX)."""
        settings = settings or CacheSettings()
        if embedder is None:
            if settings.embedder == "clip":
                raise ValueError("embedder=clip needs the pipeline's text encoder: LatentCache.open(..., embedder=fn)")
            embedder = PromptEmbedder(
                settings.memo_entries,
                child_threads=settings.embed_threads if settings.embed_process == "on" else None,
                child_timeout_s=settings.embed_timeout_s,
                dtype=minilm_dtype(settings.embed_dtype),
            )
        elif not hasattr(embedder, "embed"):
            embedder = CallableEmbedder(
                embedder, version="clip", dim=settings.clip_dim, memo_entries=settings.memo_entries
            )
        return cls(
            settings, open_store(settings, embedder.dim), embedder, redis=redis, clock=clock, key_prefix=key_prefix
        )

    # --- embedding ------------------------------------------------------------------------

    def embed(self, prompt: str) -> np.ndarray:
        return self.embedder.embed(prompt)

    def drop_memos(self) -> None:
        self.embedder.drop_memos()

    def state_steps(self, steps: int) -> list[int]:
        """Which K to capture for N steps, from settings.state_fractions."""
        return state_steps(steps, self.settings.state_fractions)

    # --- lookups --------------------------------------------------------------------------

    def lookup_exact(self, key: CacheKey, allow_shared: bool = True) -> ExactHit | None:
        return self._timeboxed("exact", self._lookup_exact, key, allow_shared)

    def lookup_approx(self, key: CacheKey, vector: np.ndarray, allow_shared: bool = True) -> ApproxHit | None:
        return self._timeboxed("approx", self._lookup_approx, key, vector, allow_shared)

    def _timeboxed(self, what: str, fn, *args):
        try:
            future = self._pool.submit(fn, *args)
            return future.result(timeout=self._timeout_s)
        except FutureTimeout:
            self.health[f"{what}_timeout"] += 1
            log.warning("cache %s lookup exceeded %.0f ms; generating fresh", what, self._timeout_s * 1000)
        except CacheUnavailableError:
            self.health[f"{what}_unavailable"] += 1
            log.debug("cache offline (optimising); %s lookup skipped", what)
        except Exception as exc:
            self.health[f"{what}_error"] += 1
            log.warning("cache %s lookup failed (%s: %s); generating fresh", what, type(exc).__name__, exc)
        return None

    def _lookup_exact(self, key: CacheKey, allow_shared: bool) -> ExactHit | None:
        now = self.clock()
        isolate = self.settings.isolate_by_tenant
        for record in self.store.retrieve([key.exact_id(isolate)], with_payload=True):
            p = record.payload
            # The id is tenant-scoped, but validate the payload too: an entry planted under this id for
            # another tenant (written around the API) is never served.
            mine = not isolate or p.get("audience") in (key.tenant, SHARED_AUDIENCE)
            if (
                mine
                and p.get("exact_key") == key.content_key()
                and p.get("image_uri")
                and float(p.get("expires_at", 0)) > now
            ):
                return ExactHit(record.id, p["image_uri"], p.get("tenant", ""))
        if isolate and allow_shared:
            where = Where(
                must=(
                    Cond("exact_key", key.content_key()),
                    Cond("audience", SHARED_AUDIENCE),
                    Cond("expires_at", gt=now),
                )
            )
            records, _ = self.store.scroll(where, ["image_uri", "tenant"], limit=1)
            for record in records:
                if record.payload.get("image_uri"):
                    return ExactHit(record.id, record.payload["image_uri"], record.payload.get("tenant", ""))
        return None

    def _approx_where(self, key: CacheKey, allow_shared: bool, now: float) -> Where:
        must: list[Cond | Where] = [
            Cond("model", key.model),
            Cond("model_version", key.model_version),
            Cond("generation", int(key.generation)),
            Cond("scheduler", key.scheduler),
            # A plain request never resumes from a state a (lossy) feature cache made; a feature-cached request
            # may resume from its own kind's states and from plain ones (exact up to K, then its own cache).
            Cond("feature", key.feature if key.feature == "off" else [key.feature, "off"]),
            Cond("adapters", key.adapters),  # nor from one made with other LoRA adapters (or none)
            Cond("steps", int(key.steps)),
            Cond("guidance", gte=float(key.guidance), lte=float(key.guidance)),
            Cond("width", int(key.width)),
            Cond("height", int(key.height)),
            Cond("expires_at", gt=now),
            Cond("n_states", gte=1),
        ]  # an image-only entry cannot seed a resumed generation
        if self.settings.isolate_by_tenant:
            must.append(Cond("audience", [key.tenant, SHARED_AUDIENCE] if allow_shared else [key.tenant]))
        return Where(must=tuple(must))

    def could_resume_many(self, queries: list[tuple[CacheKey, bool]]) -> list[bool]:
        """For each (key, allow_shared): whether the store holds any entry an approximate lookup of that key
        could resume from (same model, generation, steps, guidance, size, adapters, audience; unexpired;
        with a state). One exact count per distinct filter, no vector: the lookup stage answers a request
        that nothing could match at once, without waiting for its prompt's embedding. When the count
        fails, True (the lookup decides, as before)."""
        if not queries:
            return []
        now = self.clock()
        found: dict[str, bool] = {}  # by the filter's repr: its conditions may hold lists
        out = []
        for key, shared in queries:
            where = self._approx_where(key, shared, now)
            seen = repr(where)
            if seen not in found:
                try:
                    found[seen] = self.store.count(where) > 0
                except Exception as exc:  # the lookup itself will count the failure, if it fails too
                    log.debug("cache count failed (%s: %s); looking up", type(exc).__name__, exc)
                    found[seen] = True
            out.append(found[seen])
        return out

    def lookup_approx_many(self, queries: list[tuple[CacheKey, np.ndarray, bool]]) -> list[ApproxHit | None]:
        """``lookup_approx`` for each (key, vector, allow_shared), searched in one batched store query (the
        node's lookup stage batches the requests waiting for admission). Not time-boxed: the caller's
        thread is the batch's own, never a request's or a device's. A failure misses the whole batch."""
        if not queries:
            return []
        try:
            now = self.clock()
            found = self.store.search_many([(v, self._approx_where(k, shared, now)) for k, v, shared in queries])
            return [self._approx_hit(hits[0], key) if hits else None for hits, (key, _, _) in zip(found, queries)]
        except CacheUnavailableError:
            self.health["approx_unavailable"] += len(queries)
            log.debug("cache offline (optimising); %d approximate lookups skipped", len(queries))
        except Exception as exc:
            self.health["approx_error"] += len(queries)
            log.warning(
                "cache batched lookup of %d failed (%s: %s); generating fresh", len(queries), type(exc).__name__, exc
            )
        return [None] * len(queries)

    def _lookup_approx(self, key: CacheKey, vector: np.ndarray, allow_shared: bool) -> ApproxHit | None:
        now = self.clock()
        hits = self.store.search(vector, self._approx_where(key, allow_shared, now), limit=1)
        return self._approx_hit(hits[0], key) if hits else None

    def _approx_hit(self, hit, key: CacheKey) -> ApproxHit | None:
        """The state to resume from for the nearest stored point ``hit``, if the table grants a K."""
        p = hit.payload
        try:
            slots = {int(k): s for k, s in p["state_slots"].items()}
            stored = [int(k) for k in p["ks_present"] if int(k) in slots]
        except (KeyError, TypeError, ValueError, AttributeError):
            self._drop_corrupt(hit.id, None, p, "payload unreadable")
            return None
        k = choose_k(float(hit.score), key.steps, self._table, stored)
        if k is None:
            return None
        records = self.store.retrieve([hit.id], with_payload=False, slots=[slots[k]])
        rows = records[0].states.get(slots[k]) if records else None
        problem, state = self._verify(rows, p, k)
        if problem:
            self._drop_corrupt(hit.id, k, p, problem)
            return None
        return ApproxHit(hit.id, float(hit.score), k, state.astype(np.float32), p.get("prompt", ""))

    @staticmethod
    def _verify(rows, payload: dict, k: int) -> tuple[str | None, np.ndarray | None]:
        if rows is None:
            return "state missing", None
        if payload.get("state_dtype") != "float16":
            return f"dtype {payload.get('state_dtype')!r}", None
        try:
            shape = tuple(int(d) for d in payload["state_shape"])
            state = rows_to_state(rows, shape)
        except (KeyError, TypeError, ValueError) as exc:
            return f"shape: {exc}", None
        if not np.isfinite(state).all():
            return "non-finite values", None
        if state_checksum(state) != (payload.get("checksums") or {}).get(str(k)):
            return "checksum mismatch", None
        return None, state

    def _drop_corrupt(self, entry_id: str, k: int | None, payload: dict, why: str) -> None:
        self.health["corrupt_state"] += 1
        log.warning("cache entry %s K=%s is corrupt (%s): deleting it", entry_id, k, why)
        try:
            self._remove_states(entry_id, [k] if k is not None else None, payload)
        except Exception as exc:
            self.health["delete_error"] += 1
            log.warning("could not delete corrupt cache entry %s: %s", entry_id, exc)

    def _remove_states(self, entry_id: str, ks: list[int] | None, payload: dict) -> bool:
        """Delete some states of an entry, or the whole entry when ks is None or none would remain.
        Returns True when the entry itself went."""
        slots = {int(k): s for k, s in (payload.get("state_slots") or {}).items()}
        remaining = [x for x in (payload.get("ks_present") or []) if ks is not None and x not in ks]
        if not remaining:
            self.store.delete([entry_id])
            self.hits.forget([entry_id])
            return True
        self.store.delete_states([entry_id], [slots[x] for x in ks if x in slots])
        checksums = payload.get("checksums") or {}
        self.store.set_payload(
            [entry_id],
            {
                "ks_present": remaining,
                "n_states": len(remaining),
                "state_slots": {str(x): slots[x] for x in remaining if x in slots},
                "checksums": {str(x): checksums.get(str(x)) for x in remaining},
            },
        )
        return False

    # --- writes ---------------------------------------------------------------------------

    def write_back(
        self,
        key: CacheKey,
        vector: np.ndarray,
        states: dict[int, np.ndarray],
        image_uri: str | None,
        shareable: bool = False,
    ) -> bool:
        """Insert this generation (first writer wins). True if this call's entry is the stored one."""
        try:
            return self._write_back(key, vector, states, image_uri, shareable)
        except CacheUnavailableError:
            self.health["write_unavailable"] += 1
            log.info("cache offline (optimising): write-back of %s dropped", key.exact_id())
            return False
        except Exception as exc:
            self.health["write_error"] += 1
            log.warning("cache write-back of %s failed (%s: %s)", key.exact_id(), type(exc).__name__, exc)
            return False

    def _write_back(self, key, vector, states, image_uri, shareable) -> bool:
        return self._write_back_many([(key, vector, states, image_uri, shareable)])[0]

    def write_back_many(
        self, items: list[tuple[CacheKey, np.ndarray, dict[int, np.ndarray], str | None, bool]]
    ) -> list[bool]:
        """``write_back`` for each (key, vector, states, image_uri, shareable) in one insert-only write
        (``LatentStore.insert_many``) and one read of the writers: True where this call's entry is the stored
        one. A failure fails the batch."""
        return [outcome == "stored" for outcome in self.write_back_outcomes(items)]

    def write_back_outcomes(
        self, items: list[tuple[CacheKey, np.ndarray, dict[int, np.ndarray], str | None, bool]]
    ) -> list[str]:
        """``write_back_many``, telling apart why an entry is not this call's: "stored", "raced" (another
        writer's entry with that id was there first, which is no error), "offline" (the whole batch: the
        store is briefly closed, e.g. for its optimiser; the caller may try again in a moment) or "failed"
        (the whole batch: an error)."""
        if not items:
            return []
        try:
            return ["stored" if mine else "raced" for mine in self._write_back_many(items)]
        except CacheUnavailableError:
            self.health["write_unavailable"] += len(items)
            log.info("cache offline (optimising): %d write-backs not stored now", len(items))
            return ["offline"] * len(items)
        except Exception as exc:
            self.health["write_error"] += len(items)
            log.warning("cache write-back of %d entries failed (%s: %s)", len(items), type(exc).__name__, exc)
        return ["failed"] * len(items)

    def _write_back_many(self, items) -> list[bool]:
        # Entries are built with numpy casts and hashlib digests, which release the interpreter lock on
        # arrays this size; only the store's own conversion of the points holds it.
        points = [self.build_entry(*item) for item in items]
        self.store.insert_many(points)
        if self._optimizer is not None:
            for _ in points:
                self._optimizer.note_write()
        ids = list(dict.fromkeys(p[0] for p in points))
        writers = {r.id: r.payload.get("writer") for r in self.store.retrieve(ids, with_payload=["writer"])}
        return [writers.get(entry_id) == payload["writer"] for entry_id, _, _, payload in points]

    def build_entry(
        self, key: CacheKey, vector: np.ndarray, states: dict[int, np.ndarray], image_uri: str | None, shareable: bool
    ) -> tuple[str, np.ndarray, dict[str, np.ndarray], dict]:
        """The point write_back inserts: (id, prompt vector, slot -> rows, payload). Bad states are skipped."""
        now = self.clock()
        good: dict[int, np.ndarray] = {}
        shape = None
        for k in sorted(states):
            state = np.asarray(states[k])
            if not 0 < int(k) < key.steps:
                log.warning("cache write-back: K=%s outside 1..%d, skipped", k, key.steps - 1)
                continue
            half = state.astype(np.float16)
            if not np.isfinite(half).all():
                log.warning("cache write-back: state K=%s has non-finite values in float16, skipped", k)
                continue
            if shape is None:
                shape = half.shape
            if half.shape != shape:
                log.warning("cache write-back: state K=%s has shape %s, expected %s, skipped", k, half.shape, shape)
                continue
            good[int(k)] = half
        ks = sorted(good)[-len(self.store.slots) :]  # keep the most valuable (largest K) if too many
        slots = {k: self.store.slots[i] for i, k in enumerate(ks)}
        payload: dict[str, Any] = {
            "model": key.model,
            "model_version": key.model_version,
            "generation": int(key.generation),
            "scheduler": key.scheduler,
            "feature": key.feature,
            "adapters": key.adapters,
            "lora_names": key.adapter_names,
            "steps": int(key.steps),
            "guidance": float(key.guidance),
            "width": int(key.width),
            "height": int(key.height),
            "tenant": key.tenant,
            "shareable": bool(shareable),
            "audience": SHARED_AUDIENCE if shareable else key.tenant,
            "ks_present": ks,
            "n_states": len(ks),
            "state_slots": {str(k): s for k, s in slots.items()},
            "state_shape": list(shape) if shape is not None else [],
            "state_dtype": "float16",
            "checksums": {str(k): state_checksum(good[k]) for k in ks},
            "image_uri": image_uri,
            "exact_key": key.content_key(),
            "prompt": key.prompt,
            "negative_prompt": key.negative_prompt,
            "seed": int(key.seed),
            "embedder": self.embedder.version,
            "created_at": now,
            "expires_at": now + self.settings.ttl_seconds,
            "hits": {},  # K -> hits, folded in from the counters (fold_counters)
            "last_hit_at": None,
            "writer": uuid.uuid4().hex,  # tells this write from a concurrent one of the same key
        }
        entry_id = key.exact_id(self.settings.isolate_by_tenant)
        vector = None if vector is None else np.asarray(vector, dtype=np.float32)  # None: stored unembedded
        return entry_id, vector, {slots[k]: state_to_rows(good[k]) for k in ks}, payload

    def record_hit(self, entry_id: str, k: int) -> None:
        """Count a hit on (entry, K) for eviction; never raises."""
        try:
            self.hits.incr(entry_id, k, self.clock())
        except Exception as exc:
            self.health["hit_counter_error"] += 1
            log.warning("cache hit counter failed: %s", exc)

    def optimize_now(self) -> float:
        """Run the Edge optimiser now (blocking); seconds taken. Normally it runs in the background."""
        return self._optimizer.run_now() if self._optimizer is not None else 0.0

    # --- maintenance ----------------------------------------------------------------------

    def _entry_stats(self) -> list[EntryStats]:
        records = list(self.store.iter_records(None, _EVICTION_FIELDS))
        counters = self.hits.get_many([r.id for r in records])
        out = []
        for r in records:
            p = r.payload
            hits, last_hit = merge_hits(p, *counters.get(r.id, ({}, None)))
            state_bytes = _padded_state_bytes(p.get("state_shape") or [])
            ks = [int(k) for k in p.get("ks_present") or []]
            out.append(
                EntryStats(
                    entry_id=r.id,
                    ks=ks,
                    hits=hits,
                    created_at=float(p.get("created_at") or 0.0),
                    last_hit_at=last_hit,
                    bytes_per_state={k: state_bytes for k in ks},
                    overhead_bytes=self.embedder.dim * 4 + PAYLOAD_OVERHEAD_BYTES,
                )
            )
        return out

    def fold_counters(self) -> int:
        """Copy the hit counters into each entry's payload (`hits`: K -> count, `last_hit_at`).

        Eviction reads the counters and the payloads (the larger count per K, the later last hit), so
        a fold keeps LRU, LFU and LCBFU informed when the counters are lost: Redis restarted without
        persistence, or a node without Redis restarted. Idempotent (several nodes folding one shared
        collection agree). Returns how many payloads changed.
        """
        records = list(self.store.iter_records(None, ["hits", "last_hit_at"]))
        folded = 0
        for start in range(0, len(records), 1000):
            batch = records[start : start + 1000]
            counters = self.hits.get_many([r.id for r in batch])
            for r in batch:
                hits, last_hit = merge_hits(r.payload, *counters.get(r.id, ({}, None)))
                if (hits, last_hit) == merge_hits(r.payload, {}, None):
                    continue  # nothing new since the last fold
                try:
                    self.store.set_payload(
                        [r.id], {"hits": {str(k): n for k, n in sorted(hits.items())}, "last_hit_at": last_hit}
                    )
                except CacheUnavailableError:
                    raise  # the shard is offline: the next round folds everything again
                except Exception as exc:  # deleted meanwhile (an invalidation, an eviction): nothing to fold
                    self.health["fold_error"] += 1
                    log.info("hit counters of %s not folded: %s", r.id, exc)
                    continue
                folded += 1
        return folded

    @property
    def skip_table(self):
        """The similarity -> K table served with now."""
        return self._table

    def set_skip_table(self, table) -> None:
        """Serve with another similarity -> K table from now on (e.g. the one calibrated for this model
        version, cache.skip_table_store); empty or None: back to the settings' table."""
        self._table = validate_table(table) if table else self.settings.table()

    def stats(self) -> dict:
        entries = self._entry_stats()
        per_k: Counter = Counter(k for e in entries for k in e.ks)
        return {
            "backend": self.store.backend,
            "entries": len(entries),
            "approx_bytes": sum(e.bytes for e in entries),
            "states": sum(per_k.values()),
            "per_k": dict(sorted(per_k.items())),
            "health": dict(self.health),
        }

    def delete(self, entry_ids: Iterable[str]) -> None:
        entry_ids = list(entry_ids)
        self.store.delete(entry_ids)
        self.hits.forget(entry_ids)

    def delete_by_filter(
        self,
        *,
        model: str | None = None,
        model_version: str | None = None,
        generation: int | None = None,
        generation_below: int | None = None,
        tenant: str | None = None,
        prompt_prefix: str | None = None,
        created_before: float | None = None,
        lora: str | None = None,
    ) -> int:
        """Delete every entry matching all given criteria; returns how many went."""
        must: list[Cond] = []
        for name, value in (
            ("model", model),
            ("model_version", model_version),
            ("generation", generation),
            ("tenant", tenant),
            ("lora_names", lora),  # entries made with this adapter (any of their adapters)
        ):
            if value is not None:
                must.append(Cond(name, value))
        if generation_below is not None:
            must.append(Cond("generation", lt=generation_below))
        if created_before is not None:
            must.append(Cond("created_at", lt=created_before))
        if not must and prompt_prefix is None:
            raise ValueError("delete_by_filter needs at least one criterion")
        where = Where(must=tuple(must)) if must else None
        # prompt prefixes are matched here rather than by a prefix index: the same code on every backend
        ids = [
            r.id
            for r in self.store.iter_records(where, ["prompt"] if prompt_prefix is not None else [])
            if prompt_prefix is None or str(r.payload.get("prompt", "")).startswith(prompt_prefix)
        ]
        for start in range(0, len(ids), 1000):
            self.delete(ids[start : start + 1000])
        return len(ids)

    def expire(self, now: float | None = None) -> int:
        """Delete entries whose expires_at has passed; returns how many."""
        now = self.clock() if now is None else now
        ids = [r.id for r in self.store.iter_records(Where(must=(Cond("expires_at", lte=now),)), [])]
        for start in range(0, len(ids), 1000):
            self.delete(ids[start : start + 1000])
        return len(ids)

    def evict_to(
        self, capacity: int | None = None, policy: str | None = None, capacity_bytes: int | None = None, seed: int = 0
    ) -> int:
        """Evict by policy until at most `capacity` entries (and capacity_bytes) remain.

        Returns the units evicted: whole entries, plus single states for LCBFU.
        """
        capacity = self.settings.capacity_entries if capacity is None else capacity
        capacity_bytes = self.settings.capacity_bytes if capacity_bytes is None else capacity_bytes
        entries = self._entry_stats()
        plan = plan_eviction(make_policy(policy or self.settings.policy, seed), entries, capacity, capacity_bytes)
        for start in range(0, len(plan.delete_entries), 1000):
            self.delete(plan.delete_entries[start : start + 1000])
        if plan.delete_states:
            payloads = {
                r.id: r.payload for r in self.store.retrieve(list(plan.delete_states), with_payload=_EVICTION_FIELDS)
            }
            for entry_id, ks in plan.delete_states.items():
                if entry_id in payloads:
                    self._remove_states(entry_id, ks, payloads[entry_id])
        return plan.n_units

    def close(self) -> None:
        if self._optimizer is not None:
            self._optimizer.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def __enter__(self) -> "LatentCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _padded_state_bytes(shape) -> int:
    size = int(np.prod(shape)) if shape else 0
    return -(-size // STATE_CHUNK) * STATE_CHUNK * 2 if size else 0
