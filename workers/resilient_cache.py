"""The worker's defences around its latent cache: the cache is never required, one clock for expiry,
and sharing only for granted tenants.

- ``CacheReopener``: a node whose cache cannot open (Qdrant down, folder locked by another process,
  folder corrupt) starts without it, serves every job fresh (result ``cache.hit == "off"`` with a
  note), and retries opening in the background every ``cache_reopen_s``; once it opens, the node's
  cache and its control paths are wired in and hits resume.
- ``RedisClock``: the cache's ``created_at``/``expires_at`` and every lookup's "now" come from the
  Redis server's clock (read with TIME, then advanced with this process's monotonic clock), so nodes
  whose wall clocks disagree still agree on when an entry expires.
- ``ResilienceSettings.share_tenants``: the grant list for ``cache.share``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("reprise.worker")


class ResilienceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPRISE_", extra="ignore")

    cache_reopen_s: float = Field(
        30.0, gt=0, description="A node whose cache could not open retries this often (it serves uncached meanwhile)."
    )
    share_tenants: str = Field(
        "",
        description="Tenants whose requests may set cache.share (comma-separated, * = all). Others get share ignored, with a note.",
    )
    redis_clock_refresh_s: float = Field(
        60.0, gt=0, description="How often the cache's clock re-reads the Redis server's time."
    )

    def share_grants(self) -> frozenset[str] | None:
        """None means every tenant may share."""
        names = frozenset(t.strip() for t in self.share_tenants.split(",") if t.strip())
        return None if "*" in names else names


class RedisClock:
    """Seconds since the epoch by the Redis server's clock: one clock for every node's cache TTLs.

    TIME is read at most every ``refresh_s``; in between the reading advances with time.monotonic(),
    so a wrong or jumping local wall clock never moves expiry. If Redis cannot be read yet, the local
    clock is used (and a warning logged) until it can.
    """

    def __init__(self, redis_client, refresh_s: float = 60.0):
        self.r = redis_client
        self.refresh_s = refresh_s
        self._base: tuple[float, float] | None = None  # (server seconds, monotonic seconds) at the last read
        self._next_try = 0.0
        self._lock = threading.Lock()

    def _read(self) -> None:
        t0 = time.monotonic()
        seconds, micros = self.r.time()
        t1 = time.monotonic()
        self._base = (seconds + micros / 1e6, (t0 + t1) / 2)

    def __call__(self) -> float:
        now = time.monotonic()
        if now >= self._next_try and self._lock.acquire(blocking=False):
            try:
                self._next_try = now + self.refresh_s
                self._read()
            except Exception as exc:  # Redis restarting: keep the last reading (or the local clock)
                self._next_try = now + min(self.refresh_s, 5.0)
                log.warning(
                    "cannot read the Redis clock (%s); cache TTLs use %s",
                    exc,
                    "the last reading" if self._base else "the local clock",
                )
            finally:
                self._lock.release()
        if self._base is None:
            return time.time()
        server, mono = self._base
        return server + (time.monotonic() - mono)


class CacheReopener(threading.Thread):
    """Retries ``opener()`` until it returns a cache, then ``on_open(cache)``; logs each failure once per kind."""

    def __init__(self, opener: Callable[[], object], on_open: Callable[[object], None], every_s: float):
        super().__init__(name="reprise-cache-reopen", daemon=True)
        self.opener, self.on_open, self.every_s = opener, on_open, every_s
        self.stopped = threading.Event()
        self.attempts = 0

    def run(self) -> None:
        last_error = None
        while not self.stopped.wait(self.every_s):
            self.attempts += 1
            try:
                cache = self.opener()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:
                    log.warning("cache still unavailable (attempt %d): %s; serving without it", self.attempts, error)
                last_error = error
                continue
            try:
                self.on_open(cache)
            except Exception:
                log.exception("cache opened but could not be wired in; closing it and retrying")
                try:
                    cache.close()
                except Exception:
                    pass
                continue
            log.warning("cache available again after %d attempts: cache hits resume", self.attempts)
            return
