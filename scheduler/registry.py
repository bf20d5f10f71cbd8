"""What lives in Redis for coordination: served models and each model's cache generation.

The cache generation is a per-model counter. Every cache write is tagged with the generation the
worker read, and every lookup filters on the current one, so bumping it hides every older entry at
once, before anything is deleted.
"""

from __future__ import annotations

import json
import time

import redis

from scheduler.redis_conn import replicated_write


class ModelRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "reprise"):
        self.r = client
        self.prefix = prefix

    # --- cache generations ------------------------------------------------------------------
    def _gen_key(self, model: str) -> str:
        return f"{self.prefix}:generation:{model}"

    def generation(self, model: str) -> int:
        value = self.r.get(self._gen_key(model))
        return int(value) if value is not None else 0

    def generations(self) -> dict[str, int]:
        out = {}
        for key in self.r.scan_iter(f"{self.prefix}:generation:*"):
            key = key.decode() if isinstance(key, bytes) else key
            out[key.rsplit(":", 1)[1]] = int(self.r.get(key) or 0)
        return out

    def bump(self, model: str, reason: str) -> int:
        # Under Sentinel the new generation reaches a replica before anything relies on it: a failover never
        # brings back an older generation, so entries hidden by this bump stay hidden.
        gen = int(replicated_write(self.r, lambda pipe: pipe.incr(self._gen_key(model)))[0])
        event = {"model": model, "generation": gen, "reason": reason, "at": time.time()}
        self.r.rpush(f"{self.prefix}:generation-log", json.dumps(event))
        self.r.ltrim(f"{self.prefix}:generation-log", -1000, -1)
        self.r.publish(f"{self.prefix}:invalidate", json.dumps(event))
        return gen

    def ensure_fingerprint(self, model: str, fingerprint: str) -> int:
        """Record the loaded weights' fingerprint; a different one bumps the generation. Returns it."""
        key = f"{self.prefix}:fingerprint:{model}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    old = pipe.get(key)
                    old = old.decode() if isinstance(old, bytes) else old
                    if old == fingerprint:
                        pipe.unwatch()
                        return self.generation(model)
                    pipe.multi()
                    pipe.set(key, fingerprint)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if old is None and self.generation(model) == 0:
            return self.bump(model, f"first fingerprint {fingerprint}")
        return self.bump(model, f"weights changed {old} -> {fingerprint}")

    # --- served models ----------------------------------------------------------------------
    def announce(self, model: str, info: dict, ttl_s: float) -> None:
        self.r.set(f"{self.prefix}:model:{model}", json.dumps(info), ex=max(1, int(ttl_s)))

    def announce_node(self, node: str, info: dict, ttl_s: float) -> None:
        self.r.set(f"{self.prefix}:node:{node}", json.dumps(info), ex=max(1, int(ttl_s)))

    def live_nodes(self) -> list[str]:
        return sorted(k.decode().split(":", 2)[2] for k in self.r.scan_iter(f"{self.prefix}:node:*"))

    def nodes(self) -> dict[str, dict]:
        """Every live node's own entry (what it serves, with which skip table), by node name."""
        out = {}
        for key in self.r.scan_iter(f"{self.prefix}:node:*"):
            value = self.r.get(key)
            if value:
                key = key.decode() if isinstance(key, bytes) else key
                out[key.split(":", 2)[2]] = json.loads(value)
        return out

    def served(self, model: str) -> dict | None:
        value = self.r.get(f"{self.prefix}:model:{model}")
        return json.loads(value) if value else None

    def all_served(self) -> dict[str, dict]:
        out = {}
        for key in self.r.scan_iter(f"{self.prefix}:model:*"):
            value = self.r.get(key)
            if value:
                key = key.decode() if isinstance(key, bytes) else key
                out[key.split(":", 2)[2]] = json.loads(value)
        return out


def count_outcome(client: redis.Redis, prefix: str, model: str, hit: str, k: int | None) -> None:
    """Hit-rate counters for `reprise cache stats` (per model: exact, approximate, miss, approximate:K)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hincrby(f"{prefix}:hits:{model}", hit, 1)
        if hit == "approximate" and k is not None:
            pipe.hincrby(f"{prefix}:hits:{model}", f"approximate:{k}", 1)
        pipe.execute()
