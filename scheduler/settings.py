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
        description="Redis for the broker, the results and the coordination state.",
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

    @property
    def backend_url(self) -> str:
        return self.result_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> ClusterSettings:
    return ClusterSettings()
