"""One storage interface for the latent cache, with a Qdrant Edge and a qdrant-client backend.

Schema (one point per cached generation, id = UUID5 of the exact key):
- `prompt`: the prompt embedding, cosine, HNSW-indexed.
- `k1`..`kS`: stored-only noise states (float16, HNSW m=0, on disk), one slot per state fraction
  (S = len(state_fractions), 5 by default). A state is flattened, split into rows of STATE_CHUNK
  floats, zero-padded, and stored as a multivector. Fixed rows keep the vector size independent
  of the latent shape, so one collection holds SD 1.5 (4x64x64 = 16 rows) and SDXL (4x128x128 =
  64 rows, which one dense vector could not: 65,536 > 65,535) alike, up to 1,048,576 floats per
  state. Rows are small because Edge reserves one row for every slot a point leaves empty
  (measured: 8 KB per empty slot with 4096-float rows, 2 KB with 1024).
  Which K lives in which slot is in the payload (`state_slots`). Distance is Dot, never Cosine:
  cosine vectors are normalised on upload.
- payload: see `cache.latent_cache`, indexed on INDEXED_FIELDS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

STATE_CHUNK = 1024
MAX_STATE_ROWS = 1_048_576 // STATE_CHUNK


def state_slot_names(n: int) -> tuple[str, ...]:
    return tuple(f"k{i}" for i in range(1, n + 1))


PROMPT_VECTOR = "prompt"


def prompt_vector_of(vector) -> dict[str, list[float]]:
    """A point's prompt vector as the stores take it: none for an entry stored unembedded (a node whose
    approximate lookups do not pay stores its write-backs so, workers/approx_gate.py); exact lookups find
    such an entry, approximate searches do not (Qdrant searches a named vector only where a point has it)."""
    return {} if vector is None else {PROMPT_VECTOR: np.asarray(vector, dtype=np.float32).tolist()}


# payload field -> index type
INDEXED_FIELDS: dict[str, str] = {
    "model": "keyword",
    "model_version": "keyword",
    "generation": "integer",
    "scheduler": "keyword",
    "feature": "keyword",
    "steps": "integer",
    "guidance": "float",
    "width": "integer",
    "height": "integer",
    "tenant": "keyword",
    "shareable": "bool",
    "audience": "keyword",
    "expires_at": "float",
    "exact_key": "keyword",
    "created_at": "float",
    "n_states": "integer",
    "adapters": "keyword",
    "lora_names": "keyword",
}


class CacheError(Exception):
    """Base class of the cache's own errors."""


class CacheLockedError(CacheError):
    """The embedded cache folder is opened by another process (or another handle)."""


class CacheUnavailableError(CacheError):
    """The store is briefly offline (Edge shard closed for optimisation) or closed."""


class CacheSchemaError(CacheError):
    """An existing collection does not match this configuration (e.g. another embedder)."""


@dataclass(frozen=True)
class Cond:
    """One condition on a payload field: equality (`value`) or a numeric range."""

    field: str
    value: Any = None
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    @property
    def is_range(self) -> bool:
        return any(b is not None for b in (self.gt, self.gte, self.lt, self.lte))


@dataclass(frozen=True)
class Where:
    """A backend-neutral filter: all of `must`, at least one of `should` (if any), none of `must_not`."""

    must: tuple["Cond | Where", ...] = ()
    should: tuple["Cond | Where", ...] = ()
    must_not: tuple["Cond | Where", ...] = ()


@dataclass
class Record:
    id: str
    payload: dict[str, Any]
    score: float | None = None
    states: dict[str, np.ndarray] = field(default_factory=dict)  # slot -> (rows, STATE_CHUNK) float32


def state_to_rows(state: np.ndarray) -> np.ndarray:
    """Flatten a state to float16 and split it into zero-padded rows of STATE_CHUNK."""
    flat = np.ascontiguousarray(state, dtype=np.float16).reshape(-1)
    n_rows = max(1, -(-flat.size // STATE_CHUNK))
    if n_rows > MAX_STATE_ROWS:
        raise ValueError(f"state of {flat.size} floats exceeds {MAX_STATE_ROWS * STATE_CHUNK}")
    rows = np.zeros(n_rows * STATE_CHUNK, dtype=np.float16)
    rows[: flat.size] = flat
    return rows.reshape(n_rows, STATE_CHUNK)


def rows_to_state(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of state_to_rows: float16 array of `shape` (raises ValueError on a size mismatch)."""
    flat = np.asarray(rows, dtype=np.float32).reshape(-1)
    size = int(np.prod(shape))
    if flat.size < size or flat.size - size >= STATE_CHUNK:
        raise ValueError(f"stored state has {flat.size} floats, shape {shape} needs {size}")
    return flat[:size].astype(np.float16).reshape(shape)


class LatentStore(ABC):
    """What the cache needs from Qdrant. Implementations: EdgeStore, ClientStore."""

    backend: str
    slots: tuple[str, ...]  # names of the state vectors

    @abstractmethod
    def insert(self, point_id: str, prompt_vector: np.ndarray, states: dict[str, np.ndarray], payload: dict) -> None:
        """Insert only: if the id exists already, nothing changes (first writer wins)."""

    def insert_many(self, points: list[tuple[str, np.ndarray, dict[str, np.ndarray], dict]]) -> None:
        """Insert-only batch of (id, prompt vector, states, payload); backends override with one request."""
        for point in points:
            self.insert(*point)

    @abstractmethod
    def search(self, vector: np.ndarray, where: Where | None, limit: int = 1) -> list[Record]:
        """Nearest points by the prompt vector, with payload."""

    def search_many(self, queries: list[tuple[np.ndarray, Where | None]], limit: int = 1) -> list[list[Record]]:
        """``search`` for each (vector, where), in order; backends override with one batched request."""
        return [self.search(vector, where, limit) for vector, where in queries]

    @abstractmethod
    def retrieve(
        self, ids: list[str], with_payload: bool | list[str] = True, slots: list[str] = ()
    ) -> list[Record]: ...

    @abstractmethod
    def scroll(
        self, where: Where | None, fields: list[str] | None, limit: int, offset: Any = None
    ) -> tuple[list[Record], Any]: ...

    @abstractmethod
    def count(self, where: Where | None = None) -> int: ...

    @abstractmethod
    def delete(self, ids: list[str]) -> None: ...

    @abstractmethod
    def delete_where(self, where: Where) -> None: ...

    @abstractmethod
    def delete_states(self, ids: list[str], slots: list[str]) -> None: ...

    @abstractmethod
    def update_states(self, point_id: str, states: dict[str, np.ndarray]) -> None: ...

    @abstractmethod
    def set_payload(self, ids: list[str], payload: dict) -> None: ...

    def optimize(self) -> bool:
        """Build indexes (Edge has no background optimiser); a no-op where the backend does it."""
        return False

    def flush(self) -> None:  # noqa: B027 - optional hook: backends that buffer writes override it
        return None

    @abstractmethod
    def close(self) -> None: ...

    def iter_records(
        self, where: Where | None = None, fields: list[str] | None = None, page: int = 1000
    ) -> Iterator[Record]:
        offset = None
        while True:
            records, offset = self.scroll(where, fields, page, offset)
            yield from records
            if offset is None or not records:
                return
