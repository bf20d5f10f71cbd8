"""LatentStore on qdrant-edge-py: the Qdrant engine in-process, one shard folder per collection.

Edge has no background optimiser: until `optimize()` runs, new points are searched by brute
force. And `EdgeShard.optimize()` holds the GIL for its whole run (measured: a 10 ms ticker
thread stalled for 19 s while it optimised 8k points), so calling it on a background thread
still freezes every thread of the worker. `optimize()` here therefore closes the shard, runs
the optimiser in a child process (`python -c ...`, it needs only qdrant_edge) and reopens it;
meanwhile the store is offline: every call fails fast with CacheUnavailableError, so lookups
miss and write-backs are dropped instead of waiting.
One process owns a shard folder (its WAL is locked); a second open fails with CacheLockedError.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from cache.store import (
    INDEXED_FIELDS,
    PROMPT_VECTOR,
    STATE_CHUNK,
    CacheError,
    CacheLockedError,
    CacheSchemaError,
    CacheUnavailableError,
    Cond,
    LatentStore,
    Record,
    Where,
    prompt_vector_of,
)

_INDEX_TYPES = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "integer": qe.PayloadSchemaType.Integer,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
}


def edge_config(prompt_dim: int, slots: tuple[str, ...]) -> qe.EdgeConfig:
    state = qe.EdgeVectorParams(
        size=STATE_CHUNK,
        distance=qe.Distance.Dot,
        multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim),
        datatype=qe.VectorStorageDatatype.Float16,
        on_disk=True,
        # m=0: stored only, never indexed; the other two arguments are required by the binding
        hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000),
    )
    vectors = {PROMPT_VECTOR: qe.EdgeVectorParams(size=prompt_dim, distance=qe.Distance.Cosine)}
    vectors.update({slot: state for slot in slots})
    return qe.EdgeConfig(vectors=vectors)


def _condition(cond: Cond | Where):
    if isinstance(cond, Where):
        return _filter(cond)
    if cond.is_range:
        return qe.FieldCondition(cond.field, range=qe.RangeFloat(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte))
    if isinstance(cond.value, bool):
        raise TypeError(f"qdrant-edge-py 0.9 matches booleans as integers: filter {cond.field!r} by a keyword")
    if isinstance(cond.value, (list, tuple, set)):
        return qe.FieldCondition(cond.field, match=qe.MatchAny(list(cond.value)))
    return qe.FieldCondition(cond.field, match=qe.MatchValue(cond.value))


def _filter(where: Where | None):
    if where is None:
        return None
    return qe.Filter(
        must=[_condition(c) for c in where.must] or None,
        should=[_condition(c) for c in where.should] or None,
        must_not=[_condition(c) for c in where.must_not] or None,
    )


def _rows(state: np.ndarray) -> list[list[float]]:
    return np.asarray(state, dtype=np.float32).tolist()


# The child needs nothing but qdrant_edge: it opens the shard, optimises, closes, and says what it did.
_OPTIMIZE_CHILD = (
    "import sys, qdrant_edge as qe; shard = qe.EdgeShard.load(sys.argv[1]); changed = shard.optimize(); "
    "shard.close(); print('optimized' if changed else 'already optimal')"
)


class EdgeStore(LatentStore):
    backend = "edge"

    def __init__(
        self,
        shard: qe.EdgeShard,
        folder: Path,
        owner_file: Path,
        slots: tuple[str, ...],
        config: qe.EdgeConfig,
        optimize_in_subprocess: bool = True,
    ) -> None:
        self._shard = shard
        self.slots = slots
        self.folder = folder
        self._owner_file = owner_file
        self._config = config
        self._subprocess = optimize_in_subprocess
        self._state = threading.Condition()
        self._in_flight = 0
        self._offline = False

    @contextlib.contextmanager
    def _using(self):
        """Count a call in flight; fail fast while the shard is closed for optimisation."""
        with self._state:
            if self._offline or self._shard is None:
                raise CacheUnavailableError(f"cache shard {self.folder} is being optimised or is closed")
            self._in_flight += 1
        try:
            yield self._shard
        finally:
            with self._state:
                self._in_flight -= 1
                self._state.notify_all()

    @classmethod
    def open(cls, settings, prompt_dim: int, slots: tuple[str, ...]) -> "EdgeStore":
        root = Path(settings.path)
        root.mkdir(parents=True, exist_ok=True)
        folder = root / settings.collection
        owner_file = root / f"{settings.collection}.owner.json"
        config = edge_config(prompt_dim, slots)
        exists = folder.exists() and any(folder.iterdir())
        try:
            shard = qe.EdgeShard.load(str(folder), config) if exists else qe.EdgeShard.create(str(folder), config)
        except Exception as exc:  # the binding raises plain Exception
            text = str(exc)
            if "WouldBlock" in text or "lock" in text.lower():
                raise CacheLockedError(_locked_message(folder, owner_file)) from exc
            if exists:
                raise CacheSchemaError(
                    f"cannot open cache shard {folder} with prompt dim {prompt_dim} and {len(slots)} "
                    f"state slots (a changed embedder or state_fractions needs a new collection): {text}"
                ) from exc
            raise
        store = cls(shard, folder, owner_file, slots, config, getattr(settings, "optimize_in_subprocess", True))
        store._ensure_indexes()
        owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        return store

    def _ensure_indexes(self) -> None:
        with self._using() as shard:
            present = set(shard.info().payload_schema)
            for name, kind in INDEXED_FIELDS.items():
                if name not in present:
                    shard.update(qe.UpdateOperation.create_field_index(name, _INDEX_TYPES[kind]))

    def insert(self, point_id, prompt_vector, states, payload) -> None:
        self.insert_many([(point_id, prompt_vector, states, payload)])

    def insert_many(self, points) -> None:
        built = []
        for point_id, prompt_vector, states, payload in points:
            vector: dict[str, Any] = prompt_vector_of(prompt_vector)
            vector.update({slot: _rows(rows) for slot, rows in states.items()})
            built.append(qe.Point(point_id, vector, payload))
        # One upsert per point, inside one ``_using`` (the optimiser cannot close the shard between them):
        # the binding holds the interpreter lock for a whole update, and one upsert of a full node's wave of
        # write-backs (32 sim states) held it 13.5 ms, stalling every device thread that finished its call
        # meanwhile; point by point the longest hold is under 3 ms, and the 32 take 15.4 ms against 13.4.
        with self._using() as shard:
            for point in built:
                shard.update(qe.UpdateOperation.upsert_points([point], update_mode=qe.UpdateMode.InsertOnly))

    def search(self, vector, where, limit=1) -> list[Record]:
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist(), using=PROMPT_VECTOR),
            filter=_filter(where),
            with_payload=True,
            with_vector=False,
        )
        with self._using() as shard:
            hits = shard.query(request)
        return [Record(str(h.id), h.payload or {}, score=h.score) for h in hits]

    def search_many(self, queries, limit=1) -> list[list[Record]]:
        """One planned batch (``EdgeShard.query_batch``): the searches share one pass over the segments, so
        the interpreter lock the binding holds while it searches is taken once per batch, not per prompt."""
        if not queries:
            return []
        batch = qe.QueryBatchRequest(
            [
                qe.QueryRequest(
                    limit=limit,
                    query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist(), using=PROMPT_VECTOR),
                    filter=_filter(where),
                    with_payload=True,
                    with_vector=False,
                )
                for vector, where in queries
            ]
        )
        with self._using() as shard:
            results = shard.query_batch(batch)
        return [[Record(str(h.id), h.payload or {}, score=h.score) for h in hits] for hits in results]

    def retrieve(self, ids, with_payload=True, slots=()) -> list[Record]:
        with self._using() as shard:
            records = shard.retrieve(list(ids), with_payload=with_payload, with_vector=list(slots) if slots else False)
        out = []
        for r in records:
            vectors = r.vector or {}
            states = {s: np.asarray(vectors[s], dtype=np.float32) for s in slots if s in vectors}
            out.append(Record(str(r.id), r.payload or {}, states=states))
        return out

    def scroll(self, where, fields, limit, offset=None):
        request = qe.ScrollRequest(
            offset=offset,
            limit=limit,
            filter=_filter(where),
            with_payload=fields if fields is not None else True,
            with_vector=False,
        )
        with self._using() as shard:
            records, next_offset = shard.scroll(request)
        return [Record(str(r.id), r.payload or {}) for r in records], next_offset

    def count(self, where=None) -> int:
        with self._using() as shard:
            return shard.count(qe.CountRequest(exact=True, filter=_filter(where)))

    def delete(self, ids) -> None:
        if ids:
            self._update(qe.UpdateOperation.delete_points(list(ids)))

    def delete_where(self, where) -> None:
        self._update(qe.UpdateOperation.delete_points_by_filter(_filter(where)))

    def delete_states(self, ids, slots) -> None:
        if ids and slots:
            self._update(qe.UpdateOperation.delete_vectors(list(ids), list(slots)))

    def update_states(self, point_id, states) -> None:
        self._update(
            qe.UpdateOperation.update_vectors(
                [qe.PointVectors(point_id, {slot: _rows(rows) for slot, rows in states.items()})]
            )
        )

    def set_payload(self, ids, payload) -> None:
        if ids:
            self._update(qe.UpdateOperation.set_payload(list(ids), payload))

    def _update(self, operation) -> None:
        with self._using() as shard:
            shard.update(operation)

    def optimize(self) -> bool:
        """Build the HNSW and payload indexes. In a child process by default (see the module doc)."""
        if not self._subprocess:
            with self._using() as shard:
                return bool(shard.optimize())
        with self._state:
            if self._shard is None:
                raise CacheUnavailableError(f"cache shard {self.folder} is closed")
            self._offline = True  # new calls fail fast from here on
            while self._in_flight:
                self._state.wait()
            self._shard.close()
            self._shard = None
        try:
            done = subprocess.run(
                [sys.executable, "-c", _OPTIMIZE_CHILD, str(self.folder.resolve())], capture_output=True, text=True
            )
            if done.returncode != 0 or not ("optimized" in done.stdout or "already optimal" in done.stdout):
                raise CacheError(f"optimiser process failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            return "optimized" in done.stdout.split()
        finally:
            with self._state:
                self._shard = qe.EdgeShard.load(str(self.folder), self._config)
                self._offline = False

    def flush(self) -> None:
        with self._using() as shard:
            shard.flush()

    def close(self) -> None:
        with self._state:
            self._offline = True
            while self._in_flight:
                self._state.wait()
            shard, self._shard = self._shard, None
        if shard is not None:
            shard.close()
            self._owner_file.unlink(missing_ok=True)


def _locked_message(folder: Path, owner_file: Path) -> str:
    owner = "another process"
    try:
        info = json.loads(owner_file.read_text())
        same = " (this process)" if info.get("pid") == os.getpid() else ""
        owner = f"pid {info.get('pid')} on {info.get('host')}{same}"
    except (OSError, ValueError):
        pass
    return (
        f"cache folder {folder} is opened by {owner} — in embedded mode one worker process per node "
        f"owns the cache; use --devices to serve several devices from it, or set QDRANT_URL"
    )
