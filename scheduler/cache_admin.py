"""Operating the cache from anywhere: invalidate, purge, evict, stats.

How each stays correct without trusting a message to arrive:
- ``invalidate_model`` bumps the model's cache generation in Redis; every lookup filters on the
  generation it reads just before, so older entries are never served again (the leader's GC
  deletes them later).
- ``invalidate`` (tenant / prompt prefix / model) and ``purge`` append a numbered rule in Redis;
  every node checks the rule counter before each lookup and applies the rules it has not applied
  yet (a delete by filter) first. A node that was down applies them when it comes back.
- ``evict`` and the leader's sweeps are destructive and carry the coordinator's fencing token;
  nodes refuse a token older than the newest one in Redis.
In embedded mode each node owns its cache folder, so these go to the nodes (Celery broadcast);
the nodes' replies are aggregated here.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery import Celery

from scheduler.app import get_app
from scheduler.errors import RepriseError
from scheduler.redis_conn import redis_client as make_redis_client
from scheduler.registry import ModelRegistry
from scheduler.settings import get_settings

CONTROL_COMMAND = "reprise_cache"


class WritebacksNotDrained(RepriseError):
    """A node did not confirm, within the time asked, that its queued cache write-backs have landed."""

    code = "writebacks_not_drained"


class CacheAdmin:
    def __init__(self, app: Celery | None = None, redis_client: redis.Redis | None = None, prefix: str | None = None):
        self.app = app or get_app()
        self.r = redis_client or make_redis_client(self.app.conf.broker_url)
        self.prefix = prefix or get_settings().queue_prefix
        self.registry = ModelRegistry(self.r, self.prefix)

    # --- fencing ------------------------------------------------------------------------------
    @property
    def token_key(self) -> str:
        return f"{self.prefix}:coordinator:token"

    def current_token(self) -> int:
        return int(self.r.get(self.token_key) or 0)

    # --- invalidation -------------------------------------------------------------------------
    def invalidate_model(self, model: str, reason: str = "operator") -> dict:
        generation = self.registry.bump(model, reason)
        return {"model": model, "generation": generation}

    def add_rule(self, **criteria: Any) -> dict:
        criteria = {k: v for k, v in criteria.items() if v is not None}
        if not criteria:
            raise ValueError("an invalidation needs a model, a tenant, a prompt prefix or an age")
        seq = int(self.r.incr(f"{self.prefix}:invalidation:seq"))
        rule = {"seq": seq, "at": time.time(), **criteria}
        self.r.hset(f"{self.prefix}:invalidation:rules", seq, json.dumps(rule))
        self.r.publish(f"{self.prefix}:invalidate", json.dumps(rule))
        return rule

    def invalidate(self, model: str | None = None, tenant: str | None = None, prompt_prefix: str | None = None) -> dict:
        """Invalidate entries by tenant and/or prompt prefix (and model). Only ``model`` alone bumps the generation."""
        if model and tenant is None and prompt_prefix is None:
            return self.invalidate_model(model)
        return self.add_rule(model=model, tenant=tenant, prompt_prefix=prompt_prefix)

    def purge(self, older_than_s: float, model: str | None = None) -> dict:
        return self.add_rule(model=model, created_before=time.time() - older_than_s)

    def rules_since(self, applied: int) -> list[dict]:
        seq = int(self.r.get(f"{self.prefix}:invalidation:seq") or 0)
        if seq <= applied:
            return []
        raw = self.r.hmget(f"{self.prefix}:invalidation:rules", list(range(applied + 1, seq + 1)))
        return [json.loads(x) for x in raw if x]

    # --- node operations ----------------------------------------------------------------------
    def broadcast(
        self, op: str, params: dict | None = None, token: int | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Run ``op`` on every live node's cache; returns {node: reply}."""
        token = self.current_token() if token is None else token
        nodes = self.registry.live_nodes()  # wait for as many replies as live nodes, not the whole timeout
        replies = (
            self.app.control.broadcast(
                CONTROL_COMMAND,
                arguments={"op": op, "params": params or {}, "token": token},
                reply=True,
                timeout=timeout,
                limit=len(nodes) or None,
            )
            or []
        )
        out: dict[str, Any] = {}
        for reply in replies:
            out.update(reply)
        return out

    def evict(
        self,
        to_fraction: float | None = None,
        to_entries: int | None = None,
        policy: str | None = None,
        token: int | None = None,
    ) -> dict:
        return self.broadcast("evict", {"to_fraction": to_fraction, "to_entries": to_entries, "policy": policy}, token)

    def apply_rules_now(self) -> dict:
        return self.broadcast("apply_invalidations")

    def drain_writebacks(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until every live node's queued write-backs have landed in its cache; {node: reply}. Raises
        WritebacksNotDrained naming the nodes that did not answer drained within ``timeout_s``."""
        nodes = set(self.registry.live_nodes())
        replies = self.broadcast("drain_writebacks", {"timeout_s": timeout_s}, timeout=timeout_s + 2)
        drained = {n for n, r in replies.items() if isinstance(r, dict) and r.get("drained")}
        missing = sorted(nodes - drained) if nodes else ([] if drained else ["any node"])
        if missing:
            raise WritebacksNotDrained(
                f"write-backs not drained on {', '.join(missing)} within {timeout_s:.0f} s", {"replies": replies}
            )
        return replies

    def stats(self) -> dict:
        nodes = self.broadcast("stats")
        totals = {"entries": 0, "approx_bytes": 0, "states": 0, "per_k": {}}
        for reply in nodes.values():
            if not isinstance(reply, dict) or "entries" not in reply:
                continue
            for key in ("entries", "approx_bytes", "states"):
                totals[key] += int(reply.get(key) or 0)
            for k, n in (reply.get("per_k") or {}).items():
                totals["per_k"][str(k)] = totals["per_k"].get(str(k), 0) + n
        hits = {}
        for model in set(self.registry.generations()) | set(self.registry.all_served()):
            counts = {k.decode(): int(v) for k, v in self.r.hgetall(f"{self.prefix}:hits:{model}").items()}
            total = sum(v for k, v in counts.items() if ":" not in k)
            hits[model] = {
                "counts": counts,
                "hit_rate": {t: (counts.get(t, 0) / total if total else 0.0) for t in ("exact", "approximate", "miss")},
            }
        return {"nodes": nodes, "totals": totals, "generations": self.registry.generations(), "hits": hits}
