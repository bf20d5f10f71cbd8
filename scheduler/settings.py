"""Cluster-wide settings: the one home of every knob of the queue, the producer and Flower.

Each field reads ``REPRISE_<NAME>`` from the environment (a few well-known names such as
``REDIS_URL`` are read too). The README's settings table lists them all.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPRISE_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REPRISE_REDIS_URL", "REDIS_URL"),
        description="Redis for the broker, the results and the coordination state: redis://[:PASSWORD@]HOST:PORT/DB, "
        "or Redis Sentinel as ';'-separated sentinel://[:PASSWORD@]HOST:PORT[/DB] addresses (the password and "
        "database are the master's) with REPRISE_REDIS_SENTINEL_MASTER.",
    )
    redis_password: str | None = Field(
        None,
        description="The Redis password when REDIS_URL names none (docker-compose passes it apart from the addresses).",
    )
    redis_sentinel_master: str | None = Field(
        None,
        description="With sentinel:// addresses in REDIS_URL: the master name the sentinels monitor (required then).",
    )
    redis_sentinel_password: str | None = Field(
        None, description="With sentinel:// addresses: the sentinels' own password, if they require one."
    )
    redis_min_replicas: int = Field(
        1,
        ge=0,
        description="With Sentinel: replicas that must confirm (Redis WAIT, 1 s) a job's acceptance, a fencing token "
        "or a cache generation before it counts; fewer and the send raises JobNotAccepted (a failover cannot lose "
        "it). 0 = the master alone (stays writable with every replica down, but a failover may lose a send).",
    )
    result_url: str | None = Field(None, description="Result backend URL; defaults to redis_url.")
    queue_prefix: str = Field("reprise", description="Queues are named <prefix>.<model>; keys start with <prefix>:.")
    visibility_timeout_s: int = Field(
        3600, description="Redis redelivers an unacknowledged job after this long: keep it above the longest job."
    )
    restore_interval_s: int = Field(
        10, ge=1, description="How often workers look for unacknowledged jobs past their visibility timeout."
    )
    soft_time_limit_s: float = Field(
        1800,
        ge=0,
        description="A job running past this is stopped by the loop at its next step (JobTimeout); 0 = no limit. "
        "A message's own soft_time_limit / time_limit (the smaller) overrides it.",
    )
    artifact_url: str = Field(
        "./var/artifacts",
        description="Artifact store: a directory or any fsspec URL. Images go there, and the LoRA adapters "
        "`reprise lora add` registers (loras/<model>/<version>.safetensors), so every node must read it.",
    )
    result_expires_s: int = Field(86400, description="How long results stay in Redis.")
    default_model: str = Field(
        "tiny", description="Model that serves a request naming none: it is routed to <prefix>.<default_model>."
    )
    flower_port: int = Field(5555, description="Port of `reprise flower`.")
    flower_user: str = Field("reprise", description="Flower basic-auth user.")
    flower_password: str = Field(
        "", description="Flower basic-auth password; empty means generated at start and printed once."
    )
    progress_interval_s: float = Field(0.2, description="Least time between two PROGRESS updates of one job.")

    # --- `reprise api`: the HTTP front door (scheduler/api) ---
    api_host: str = Field("127.0.0.1", description="Address `reprise api` listens on (0.0.0.0 in a container).")
    api_port: int = Field(8000, description="Port of `reprise api`.")
    api_public_url: str = Field(
        "",
        description="Base URL clients reach the API at (behind a load balancer), used in image URLs; empty: the "
        "URL the request came in on.",
    )
    api_max_body_bytes: int = Field(
        262144, ge=1024, description="Largest request body the API accepts; a larger one is refused with 413."
    )
    api_rate_per_min: int = Field(
        120,
        ge=1,
        description="Generation requests (POST) a tenant may make per minute, over all API replicas; more get 429 "
        "with Retry-After. `reprise keys create --rate-per-min` sets one tenant's own.",
    )
    api_max_concurrent: int = Field(
        16,
        ge=1,
        description="Images a tenant may have queued or running at once; a request that would pass it gets 429. "
        "`reprise keys create --max-concurrent` sets one tenant's own.",
    )
    api_sync_timeout_s: float = Field(
        300,
        gt=0,
        description="How long POST /v1/images/generations waits for its images before a 504 naming the job "
        "(poll GET /v1/jobs/{id}).",
    )
    api_file_url_ttl_s: int = Field(
        3600, ge=1, description="Life of the signed image URLs the API hands out (`response_format: url`)."
    )
    api_signing_key: str = Field(
        "",
        description="HMAC key of signed image URLs; empty: one is generated and kept in Redis, shared by every "
        "API replica.",
    )
    webhook_allow_hosts: str = Field(
        "",
        description="Comma-separated webhook hosts exempt from the SSRF rule (loopback, private, link-local and "
        "metadata addresses are refused otherwise), e.g. `127.0.0.1,hooks.internal`.",
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="Connect and read timeout of one webhook delivery.")
    webhook_max_attempts: int = Field(
        6, ge=1, description="Deliveries tried per event before it goes to the dead-letter list."
    )
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="Wait before the first retry of a webhook; doubled at each further retry."
    )

    @property
    def backend_url(self) -> str:
        return self.result_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> ClusterSettings:
    return ClusterSettings()
