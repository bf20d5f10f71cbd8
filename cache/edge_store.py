"""LatentStore on qdrant-edge-py: the Qdrant engine in-process, one shard folder per collection.

Edge has no background optimiser: until `optimize()` runs, new points are searched by brute
force. LatentCache schedules `optimize()` on a background thread, never on the lookup path.
One process owns a shard folder (its WAL is locked); a second open fails with CacheLockedError.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from cache.store import (INDEXED_FIELDS, PROMPT_VECTOR, STATE_CHUNK, CacheLockedError,
                         CacheSchemaError, Cond, LatentStore, Record, Where)

_INDEX_TYPES = {"keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer,
                "float": qe.PayloadSchemaType.Float, "bool": qe.PayloadSchemaType.Bool}


def edge_config(prompt_dim: int, slots: tuple[str, ...]) -> qe.EdgeConfig:
    state = qe.EdgeVectorParams(
        size=STATE_CHUNK, distance=qe.Distance.Dot,
        multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim),
        datatype=qe.VectorStorageDatatype.Float16, on_disk=True,
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
    return qe.Filter(must=[_condition(c) for c in where.must] or None,
                     should=[_condition(c) for c in where.should] or None,
                     must_not=[_condition(c) for c in where.must_not] or None)


def _rows(state: np.ndarray) -> list[list[float]]:
    return np.asarray(state, dtype=np.float32).tolist()


class EdgeStore(LatentStore):
    backend = "edge"

    def __init__(self, shard: qe.EdgeShard, folder: Path, owner_file: Path, slots: tuple[str, ...]) -> None:
        self._shard = shard
        self.slots = slots
        self.folder = folder
        self._owner_file = owner_file

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
                raise CacheSchemaError(f"cannot open cache shard {folder} with prompt dim {prompt_dim} and {len(slots)} "
                                       f"state slots (a changed embedder or state_fractions needs a new collection): {text}") from exc
            raise
        store = cls(shard, folder, owner_file, slots)
        store._ensure_indexes()
        owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        return store

    def _ensure_indexes(self) -> None:
        present = set(self._shard.info().payload_schema)
        for name, kind in INDEXED_FIELDS.items():
            if name not in present:
                self._shard.update(qe.UpdateOperation.create_field_index(name, _INDEX_TYPES[kind]))

    def insert(self, point_id, prompt_vector, states, payload) -> None:
        self.insert_many([(point_id, prompt_vector, states, payload)])

    def insert_many(self, points) -> None:
        built = []
        for point_id, prompt_vector, states, payload in points:
            vector: dict[str, Any] = {PROMPT_VECTOR: np.asarray(prompt_vector, dtype=np.float32).tolist()}
            vector.update({slot: _rows(rows) for slot, rows in states.items()})
            built.append(qe.Point(point_id, vector, payload))
        self._shard.update(qe.UpdateOperation.upsert_points(built, update_mode=qe.UpdateMode.InsertOnly))

    def search(self, vector, where, limit=1) -> list[Record]:
        hits = self._shard.query(qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist(), using=PROMPT_VECTOR),
            filter=_filter(where), with_payload=True, with_vector=False))
        return [Record(str(h.id), h.payload or {}, score=h.score) for h in hits]

    def retrieve(self, ids, with_payload=True, slots=()) -> list[Record]:
        records = self._shard.retrieve(list(ids), with_payload=with_payload, with_vector=list(slots) if slots else False)
        out = []
        for r in records:
            vectors = r.vector or {}
            states = {s: np.asarray(vectors[s], dtype=np.float32) for s in slots if s in vectors}
            out.append(Record(str(r.id), r.payload or {}, states=states))
        return out

    def scroll(self, where, fields, limit, offset=None):
        records, next_offset = self._shard.scroll(qe.ScrollRequest(
            offset=offset, limit=limit, filter=_filter(where),
            with_payload=fields if fields is not None else True, with_vector=False))
        return [Record(str(r.id), r.payload or {}) for r in records], next_offset

    def count(self, where=None) -> int:
        return self._shard.count(qe.CountRequest(exact=True, filter=_filter(where)))

    def delete(self, ids) -> None:
        if ids:
            self._shard.update(qe.UpdateOperation.delete_points(list(ids)))

    def delete_where(self, where) -> None:
        self._shard.update(qe.UpdateOperation.delete_points_by_filter(_filter(where)))

    def delete_states(self, ids, slots) -> None:
        if ids and slots:
            self._shard.update(qe.UpdateOperation.delete_vectors(list(ids), list(slots)))

    def update_states(self, point_id, states) -> None:
        self._shard.update(qe.UpdateOperation.update_vectors(
            [qe.PointVectors(point_id, {slot: _rows(rows) for slot, rows in states.items()})]))

    def set_payload(self, ids, payload) -> None:
        if ids:
            self._shard.update(qe.UpdateOperation.set_payload(list(ids), payload))

    def optimize(self) -> bool:
        return bool(self._shard.optimize())

    def flush(self) -> None:
        self._shard.flush()

    def close(self) -> None:
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
    return (f"cache folder {folder} is opened by {owner} — in embedded mode one worker process per node "
            f"owns the cache; use --devices to serve several devices from it, or set QDRANT_URL")
