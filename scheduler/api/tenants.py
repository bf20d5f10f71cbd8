"""API keys and tenants, in Redis: `reprise keys create | list | revoke`, Bearer auth, per-tenant limits.

A key is 32 random bytes; Redis keeps only its SHA-256. A salted slow hash (bcrypt, argon2) protects
low-entropy passwords; a random key has nothing to brute-force, and a fast hash keeps every request's
lookup at one GET. Each tenant has one webhook secret (`whsec_...`), made with its first key.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass

import redis

from scheduler.api.webhooks import new_secret

KEY_PREFIX = "rk_"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Tenant:
    name: str
    webhook_secret: str
    rate_per_min: int | None = None
    max_concurrent: int | None = None


@dataclass
class KeyStore:
    r: redis.Redis
    prefix: str

    def _key(self, digest: str) -> str:
        return f"{self.prefix}:api:key:{digest}"

    def _tenant_key(self, name: str) -> str:
        return f"{self.prefix}:api:tenant:{name}"

    @property
    def _index(self) -> str:  # key id -> digest, for list and revoke
        return f"{self.prefix}:api:keys"

    def tenant(self, name: str) -> Tenant | None:
        raw = self.r.get(self._tenant_key(name))
        return Tenant(**json.loads(raw)) if raw else None

    def create(self, tenant: str, rate_per_min: int | None = None, max_concurrent: int | None = None) -> dict:
        """A new key for ``tenant`` (created with its webhook secret if new). The key is returned only here."""
        record = self.tenant(tenant) or Tenant(tenant, new_secret())
        if rate_per_min is not None:
            record.rate_per_min = rate_per_min
        if max_concurrent is not None:
            record.max_concurrent = max_concurrent
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = key_hash(key)
        key_id = "key_" + digest[:12]
        meta = {"id": key_id, "tenant": tenant, "created": time.time(), "hint": key[:7] + "..." + key[-4:]}
        with self.r.pipeline() as pipe:
            pipe.set(self._tenant_key(tenant), json.dumps(record.__dict__))
            pipe.set(self._key(digest), json.dumps(meta))
            pipe.hset(self._index, key_id, digest)
            pipe.execute()
        return {"key": key, "webhook_secret": record.webhook_secret, "id": key_id, "tenant": tenant}

    def authenticate(self, key: str) -> dict | None:
        """The key's record ({id, tenant, ...}) or None for an unknown or revoked key."""
        raw = self.r.get(self._key(key_hash(key)))
        return json.loads(raw) if raw else None

    def list(self, tenant: str | None = None) -> list[dict]:
        out = []
        for _key_id, digest in sorted(self.r.hgetall(self._index).items()):
            raw = self.r.get(self._key(digest.decode()))
            if raw:
                meta = json.loads(raw)
                if tenant is None or meta["tenant"] == tenant:
                    out.append(meta)
        return out

    def revoke(self, key_id: str) -> bool:
        digest = self.r.hget(self._index, key_id)
        if digest is None:
            return False
        with self.r.pipeline() as pipe:
            pipe.delete(self._key(digest.decode()))
            pipe.hdel(self._index, key_id)
            pipe.execute()
        return True


@dataclass
class Limits:
    """Per-tenant request rate (fixed one-minute windows shared by every replica through Redis) and images in
    flight. A few lines on INCR and a sorted set; a rate-limit library would add a dependency for no more."""

    r: redis.Redis
    prefix: str

    def take(self, tenant: str, per_min: int) -> float | None:
        """Count one request; None if allowed, else the seconds until the window ends (Retry-After)."""
        now = time.time()
        window = int(now // 60)
        key = f"{self.prefix}:api:rate:{tenant}:{window}"
        with self.r.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count = pipe.execute()[0]
        if count <= per_min:
            return None
        return max(1.0, math.ceil((window + 1) * 60 - now))

    def _inflight(self, tenant: str) -> str:
        return f"{self.prefix}:api:inflight:{tenant}"

    def admit(self, tenant: str, task_ids: list[str], cap: int, is_done, max_age_s: float = 86400) -> bool:
        """Record ``task_ids`` as in flight if the tenant stays within ``cap``; tasks that ended are pruned first
        (``is_done(task_id)``), and tasks older than ``max_age_s`` (their results have expired: ended long ago or
        lost). Added, then counted, then taken back if over: two replicas cannot both pass."""
        key = self._inflight(tenant)
        self.r.zremrangebyscore(key, "-inf", time.time() - max_age_s)
        for member in self.r.zrange(key, 0, -1):
            member = member.decode()
            if is_done(member):
                self.r.zrem(key, member)
        now = time.time()
        self.r.zadd(key, {t: now for t in task_ids})
        if self.r.zcard(key) > cap:
            self.r.zrem(key, *task_ids)
            return False
        self.r.expire(key, int(max_age_s) + 60)
        return True

    def release(self, tenant: str, task_ids: list[str]) -> None:
        if task_ids:
            self.r.zrem(self._inflight(tenant), *task_ids)
