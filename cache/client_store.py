"""LatentStore on qdrant-client: a Qdrant server (QDRANT_URL) or the client's local mode (path).

Local mode keeps every vector in RAM as float32 and searches by brute force in Python (README,
"Lookup latency": p50 486 ms at 10k entries): it exists for tests and small caches; the server
path is the production one and uses exactly the same calls.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient, models

from cache.store import (
    INDEXED_FIELDS,
    PROMPT_VECTOR,
    STATE_CHUNK,
    CacheLockedError,
    CacheSchemaError,
    Cond,
    LatentStore,
    Record,
    Where,
    prompt_vector_of,
)

_INDEX_TYPES = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "integer": models.PayloadSchemaType.INTEGER,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
}


def vectors_config(prompt_dim: int, slots: tuple[str, ...]) -> dict[str, models.VectorParams]:
    state = models.VectorParams(
        size=STATE_CHUNK,
        distance=models.Distance.DOT,
        on_disk=True,
        datatype=models.Datatype.FLOAT16,
        hnsw_config=models.HnswConfigDiff(m=0),  # stored only, never indexed
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
    )
    config = {PROMPT_VECTOR: models.VectorParams(size=prompt_dim, distance=models.Distance.COSINE)}
    config.update({slot: state for slot in slots})
    return config


def _condition(cond: Cond | Where):
    if isinstance(cond, Where):
        return _filter(cond)
    if cond.is_range:
        return models.FieldCondition(
            key=cond.field, range=models.Range(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte)
        )
    if isinstance(cond.value, (list, tuple, set)):
        return models.FieldCondition(key=cond.field, match=models.MatchAny(any=list(cond.value)))
    return models.FieldCondition(key=cond.field, match=models.MatchValue(value=cond.value))


def _filter(where: Where | None):
    if where is None:
        return None
    return models.Filter(
        must=[_condition(c) for c in where.must] or None,
        should=[_condition(c) for c in where.should] or None,
        must_not=[_condition(c) for c in where.must_not] or None,
    )


class ClientStore(LatentStore):
    def __init__(self, client: QdrantClient, collection: str, backend: str, settings, slots: tuple[str, ...]) -> None:
        self._client = client
        self.slots = slots
        self.collection = collection
        self.backend = backend
        # local mode is plain Python without locks; a server client is thread-safe
        self._lock = threading.RLock() if backend == "local" else contextlib.nullcontext()
        consistency = settings.read_consistency
        if isinstance(consistency, str):
            consistency = models.ReadConsistencyType(consistency)
        self._read = {"consistency": consistency} if backend == "server" else {}
        self._write = {"ordering": models.WriteOrdering(settings.write_ordering)} if backend == "server" else {}

    @classmethod
    def open(cls, settings, prompt_dim: int, slots: tuple[str, ...]) -> "ClientStore":
        if settings.backend == "server":
            client = QdrantClient(
                url=settings.qdrant_url, api_key=settings.qdrant_api_key, prefer_grpc=settings.prefer_grpc, timeout=10
            )
        else:
            root = Path(settings.path)
            root.mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=str(root / "local"))
            except RuntimeError as exc:
                if "already accessed" not in str(exc):
                    raise
                raise CacheLockedError(
                    f"cache folder {root / 'local'} is opened by another process — in embedded mode one worker "
                    f"process per node owns the cache; use --devices to serve several devices from it, "
                    f"or set QDRANT_URL"
                ) from exc
        store = cls(client, settings.collection, settings.backend, settings, slots)
        store._ensure_collection(settings, prompt_dim)
        return store

    def _ensure_collection(self, settings, prompt_dim: int) -> None:
        if not self._client.collection_exists(self.collection):
            try:
                self._client.create_collection(
                    self.collection,
                    vectors_config=vectors_config(prompt_dim, self.slots),
                    on_disk_payload=True,
                    replication_factor=settings.replication_factor,
                    write_consistency_factor=settings.write_consistency_factor,
                )
            except Exception:
                # another process created it between our check and create: fine if it exists now
                if not self._client.collection_exists(self.collection):
                    raise
        params = self._client.get_collection(self.collection).config.params.vectors
        params = params if isinstance(params, dict) else {}
        have = params[PROMPT_VECTOR].size if PROMPT_VECTOR in params else None
        if have != prompt_dim or any(s not in params or params[s].size != STATE_CHUNK for s in self.slots):
            raise CacheSchemaError(
                f"collection {self.collection} does not match: prompt vectors of size {have} (embedder: "
                f"{prompt_dim}), state slots {sorted(k for k in params if k != PROMPT_VECTOR)} "
                f"(need {list(self.slots)} of {STATE_CHUNK}); use another collection name"
            )
        if self.backend == "server":  # local mode has no payload indexes
            schema = self._client.get_collection(self.collection).payload_schema or {}
            for name, kind in INDEXED_FIELDS.items():
                if name not in schema:
                    self._client.create_payload_index(self.collection, name, field_schema=_INDEX_TYPES[kind], wait=True)

    def insert(self, point_id, prompt_vector, states, payload) -> None:
        self.insert_many([(point_id, prompt_vector, states, payload)])

    def insert_many(self, points) -> None:
        structs = []
        for point_id, prompt_vector, states, payload in points:
            vector = prompt_vector_of(prompt_vector)
            vector.update({slot: np.asarray(rows, dtype=np.float32).tolist() for slot, rows in states.items()})
            structs.append(models.PointStruct(id=point_id, vector=vector, payload=payload))
        with self._lock:
            self._client.upsert(
                self.collection, structs, update_mode=models.UpdateMode.INSERT_ONLY, wait=True, **self._write
            )

    def search(self, vector, where, limit=1) -> list[Record]:
        with self._lock:
            res = self._client.query_points(
                self.collection,
                query=np.asarray(vector, dtype=np.float32).tolist(),
                using=PROMPT_VECTOR,
                query_filter=_filter(where),
                limit=limit,
                with_payload=True,
                with_vectors=False,
                **self._read,
            )
        return [Record(str(p.id), p.payload or {}, score=p.score) for p in res.points]

    def retrieve(self, ids, with_payload=True, slots=()) -> list[Record]:
        with self._lock:
            records = self._client.retrieve(
                self.collection,
                list(ids),
                with_payload=with_payload,
                with_vectors=list(slots) if slots else False,
                **self._read,
            )
        out = []
        for r in records:
            vectors = r.vector if isinstance(r.vector, dict) else {}
            states = {s: np.asarray(vectors[s], dtype=np.float32) for s in slots if s in vectors}
            out.append(Record(str(r.id), r.payload or {}, states=states))
        return out

    def scroll(self, where, fields, limit, offset=None):
        with self._lock:
            records, next_offset = self._client.scroll(
                self.collection,
                scroll_filter=_filter(where),
                limit=limit,
                offset=offset,
                with_payload=fields if fields is not None else True,
                with_vectors=False,
                **self._read,
            )
        return [Record(str(r.id), r.payload or {}) for r in records], next_offset

    def count(self, where=None) -> int:
        with self._lock:
            return self._client.count(self.collection, count_filter=_filter(where), exact=True).count

    def delete(self, ids) -> None:
        if ids:
            with self._lock:
                self._client.delete(self.collection, models.PointIdsList(points=list(ids)), wait=True, **self._write)

    def delete_where(self, where) -> None:
        with self._lock:
            self._client.delete(self.collection, models.FilterSelector(filter=_filter(where)), wait=True, **self._write)

    def delete_states(self, ids, slots) -> None:
        if ids and slots:
            with self._lock:
                self._client.delete_vectors(
                    self.collection, vectors=list(slots), points=list(ids), wait=True, **self._write
                )

    def update_states(self, point_id, states) -> None:
        vector = {slot: np.asarray(rows, dtype=np.float32).tolist() for slot, rows in states.items()}
        with self._lock:
            self._client.update_vectors(
                self.collection, [models.PointVectors(id=point_id, vector=vector)], wait=True, **self._write
            )

    def set_payload(self, ids, payload) -> None:
        if ids:
            with self._lock:
                self._client.set_payload(self.collection, payload=payload, points=list(ids), wait=True, **self._write)

    def close(self) -> None:
        with self._lock:
            self._client.close()
