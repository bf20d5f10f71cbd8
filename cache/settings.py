"""Every knob of the latent cache, read from the environment (prefix REPRISE_CACHE_)."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from cache.skip_table import DEFAULT_TABLES, SkipTable, validate_table

MAX_STATE_SLOTS = 8  # one named state vector per fraction; Edge reserves a row for each empty one


def _floats(value):
    if isinstance(value, str):
        return [float(v) for v in value.replace(";", ",").split(",") if v.strip()]
    return value


class CacheSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPRISE_CACHE_", extra="ignore", populate_by_name=True)

    backend: Literal["edge", "local", "server"] = Field(
        "edge",
        description="Qdrant backend: edge (qdrant-edge-py in-process), local (qdrant-client local mode) or server (QDRANT_URL; implied when QDRANT_URL is set).",
    )
    path: str = Field(
        "./var/qdrant", description="Folder of the embedded cache (edge and local backends); one process owns it."
    )
    collection: str = Field("reprise_latents", description="Collection (server/local) or shard folder name (edge).")
    qdrant_url: str | None = Field(
        None,
        validation_alias=AliasChoices("QDRANT_URL", "REPRISE_CACHE_QDRANT_URL"),
        description="Qdrant server URL; setting it selects the server backend.",
    )
    qdrant_api_key: str | None = Field(
        None,
        validation_alias=AliasChoices("QDRANT_API_KEY", "REPRISE_CACHE_QDRANT_API_KEY"),
        description="Qdrant server API key.",
    )
    prefer_grpc: bool = Field(True, description="Talk gRPC to a Qdrant server (faster for multi-KB state vectors).")
    replication_factor: int = Field(
        2, ge=1, description="Copies of each shard when the server backend creates the collection."
    )
    write_consistency_factor: int = Field(
        1, ge=1, description="Replicas that must acknowledge a write (server backend)."
    )
    read_consistency: Literal["all", "majority", "quorum"] | int = Field(
        1, description="Replicas a server read consults: an int, or all/majority/quorum."
    )
    write_ordering: Literal["weak", "medium", "strong"] = Field("weak", description="Server write ordering guarantee.")
    lookup_timeout_ms: float = Field(
        50.0, gt=0, description="Time box of one cache lookup; past it the job is generated fresh."
    )
    state_fractions: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5],
        description="Fractions of N at which noise states are captured (comma-separated).",
    )
    capacity_entries: int = Field(10_000, ge=1, description="Cached generations kept by evict_to.")
    capacity_bytes: int | None = Field(
        None, ge=1, description="Optional cap on the approximate bytes of stored states."
    )
    policy: Literal["lcbfu", "lru", "lfu", "fifo", "lifo", "random"] = Field("lcbfu", description="Eviction policy.")
    ttl_seconds: float = Field(7 * 24 * 3600, gt=0, description="Lifetime of an entry; expire() deletes it afterwards.")
    embedder: Literal["auto", "minilm", "clip"] = Field(
        "auto",
        description="Prompt embedder: minilm (all-MiniLM-L6-v2), clip (the model's own text encoder, pooled) or auto: clip where a table is calibrated for the model's encoder (stored for this model version, or shipped in its model_index.json), else minilm.",
    )
    clip_dim: int = Field(
        768, ge=1, description="Dimension of the clip embedder's vectors (SD 1.5's text encoder: 768)."
    )
    skip_table: Annotated[list[tuple[float, float]] | None, NoDecode] = Field(
        None,
        description="Similarity->fraction table 's:f,s:f,...'; default per embedder (MiniLM calibrated; clip: the model's calibrated table, else NIRVANA's).",
    )
    isolate_by_tenant: bool = Field(True, description="Lookups only see the tenant's own entries plus shareable ones.")
    optimize_after_writes: int = Field(
        1000, ge=1, description="Edge: run optimize() in the background after this many writes."
    )
    optimize_interval_s: float = Field(
        300.0, gt=0, description="Edge: also run optimize() this often when writes are pending."
    )
    optimize_in_subprocess: bool = Field(
        True,
        description="Edge: optimise in a child process (the cache is offline meanwhile) instead of in-process, where it holds the GIL and freezes the worker.",
    )
    memo_entries: int = Field(50_000, ge=1, description="Prompt embeddings memoised per process.")
    embed_threads: int = Field(
        1,
        ge=1,
        description="Torch threads of a worker's cache threads (the batched prompt embedding, the write-back writer), so the embedder never takes the cores the devices compute on.",
    )
    embed_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Where MiniLM embeds prompts. on: in a child process of the worker (on embed_threads torch threads), so that its many small torch calls never wait for, nor hold, the interpreter lock of the device and job threads; off: in the process. auto: on for a worker whose devices are accelerators (or sim), off for one that computes on the CPU (a child would oversubscribe the cores the device's own threads use) and outside a worker.",
    )
    embed_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The dtype MiniLM runs in (its vectors are float32 either way). auto: bfloat16 where the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX): about 1.5x cheaper a prompt, vectors within a cosine of 1e-4 of float32's; float32 elsewhere, where bfloat16 is emulated and slower.",
    )
    embed_timeout_s: float = Field(
        60.0,
        gt=0,
        description="With embed_process on: a call the child process leaves unanswered this long means it hangs: it is killed, the call fails (its lookups miss) and the next call starts a new child.",
    )
    batch_max: int = Field(
        64,
        ge=1,
        description="Most requests a worker embeds and searches in one batched lookup, or writes in one upsert.",
    )

    @field_validator("state_fractions", mode="before")
    @classmethod
    def _parse_fractions(cls, value):
        value = _floats(value)
        if not value or len(value) > MAX_STATE_SLOTS or any(not 0 < f < 1 for f in value):
            raise ValueError(f"state_fractions: 1..{MAX_STATE_SLOTS} fractions in (0, 1)")
        return value

    @field_validator("skip_table", mode="before")
    @classmethod
    def _parse_table(cls, value):
        if isinstance(value, str):
            value = [tuple(float(x) for x in row.split(":")) for row in value.split(",") if row.strip()]
        return value

    @model_validator(mode="after")
    def _server_when_url(self):
        if self.qdrant_url and self.backend != "server":
            self.backend = "server"
        if self.backend == "server" and not self.qdrant_url:
            raise ValueError("backend=server needs QDRANT_URL")
        return self

    def table(self) -> SkipTable:
        """The similarity->skip-fraction table in force."""
        return (
            validate_table(self.skip_table)
            if self.skip_table
            else DEFAULT_TABLES.get(self.embedder, DEFAULT_TABLES["minilm"])
        )
