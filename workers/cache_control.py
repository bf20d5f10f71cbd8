"""A node's side of cache operations: invalidation rules, the coordinator's duties, stats.

- Invalidation rules live in Redis (scheduler/cache_admin.py). Before every lookup the node reads
  the rule counter (one GET) and applies the rules it has not applied yet, so correctness never
  depends on a broadcast arriving. The pub/sub message only drops in-process memos sooner.
- Destructive duties (expire, GC, evict) arrive as a Celery broadcast with the coordinator's
  fencing token and are refused when the token is older than the newest one in Redis.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from celery.worker.control import control_command

from scheduler.app import get_app
from scheduler.cache_admin import CONTROL_COMMAND, CacheAdmin

log = logging.getLogger("reprise.worker")

_service = None
_follower: "InvalidationFollower | None" = None


class StaleToken(Exception):
    pass


class InvalidationFollower:
    """Applies Redis invalidation rules to this node's cache, each once, in order."""

    def __init__(self, service, admin: CacheAdmin, state_file: Path | None):
        self.service, self.admin, self.state_file = service, admin, state_file
        self.applied = int(state_file.read_text()) if state_file and state_file.exists() else 0
        self.lock = threading.Lock()

    def catch_up(self) -> int:
        try:
            rules = self.admin.rules_since(self.applied)
        except Exception as exc:  # Redis away: the generation filter still holds; try next lookup
            log.warning("cannot read invalidation rules: %s", exc)
            return 0
        if not rules:
            return 0
        with self.lock:
            deleted = 0
            for rule in rules:
                if rule["seq"] <= self.applied:
                    continue
                deleted += self.service.cache.delete_by_filter(
                    model=rule.get("model"),
                    tenant=rule.get("tenant"),
                    prompt_prefix=rule.get("prompt_prefix"),
                    lora=rule.get("lora"),
                    # a rule covers what existed when it was made, never later entries
                    created_before=min(float(rule.get("created_before", rule["at"])), float(rule["at"])),
                )
                self.applied = rule["seq"]
                if self.state_file:
                    self.state_file.write_text(str(self.applied))
            drop_memos(self.service)
            log.info("applied invalidation rules up to %d (%d entries deleted)", self.applied, deleted)
            return deleted


def drop_memos(service) -> None:
    memo = getattr(service, "text_memo", None)
    if memo is not None:
        memo.clear()
    if service.cache is not None and hasattr(service.cache, "drop_memos"):
        service.cache.drop_memos()


def start_control(service, redis_client, cluster) -> InvalidationFollower:
    """Wire this node's cache into the cluster's control paths."""
    global _service, _follower
    from cache import CacheSettings

    _service = service
    settings = CacheSettings()
    state_file = None
    if getattr(service.cache.store, "backend", "") in ("edge", "local"):
        state_file = Path(settings.path) / "applied-invalidations"
    _follower = InvalidationFollower(
        service, CacheAdmin(redis_client=redis_client, prefix=cluster.queue_prefix), state_file
    )
    service.before_lookup = _follower.catch_up
    _follower.catch_up()
    _listen(service, redis_client, f"{cluster.queue_prefix}:invalidate")
    return _follower


def _listen(service, redis_client, channel: str) -> None:
    def run() -> None:
        while True:
            try:
                pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                for message in pubsub.listen():
                    event = json.loads(message["data"])
                    log.info("invalidation broadcast: %s", event)
                    drop_memos(service)
            except Exception as exc:  # Redis restarting: resubscribe
                log.warning("invalidation channel lost (%s); resubscribing", exc)
                time.sleep(1.0)

    threading.Thread(target=run, name="reprise-invalidation", daemon=True).start()


def _check_token(token: int) -> None:
    current = _follower.admin.current_token()
    if int(token) < current:
        raise StaleToken(f"fencing token {token} is stale (newest is {current})")


def run_op(op: str, params: dict, token: int) -> dict:
    """One cache operation on this node (also called directly by tests)."""
    service = _service
    if service is None or service.cache is None:
        return {"error": "this node has no cache"}
    cache = service.cache
    started = time.perf_counter()
    if op == "stats":
        out = cache.stats()
        out["applied_invalidations"] = _follower.applied
    elif op == "apply_invalidations":
        out = {"deleted": _follower.catch_up(), "applied": _follower.applied}
    elif op == "drain_writebacks":  # every write-back queued so far has landed (or failed) when this answers
        service.drain_writebacks(timeout=float(params.get("timeout_s", 30.0)))
        out = {"drained": True, **{k: v for k, v in service.counters.items() if k.startswith("writeback")}}
    elif op in ("expire", "gc", "evict", "fold"):
        _check_token(token)
        if op == "expire":
            out = {"expired": cache.expire()}
        elif op == "gc":
            generation = service.registry.generation(service.model_name)
            out = {
                "deleted": cache.delete_by_filter(model=service.model_name, generation_below=generation),
                "generation": generation,
            }
        elif op == "evict":
            capacity = params.get("to_entries")
            if capacity is None and params.get("to_fraction") is not None:
                capacity = int(cache.settings.capacity_entries * float(params["to_fraction"]))
            out = {
                "evicted": cache.evict_to(capacity, params.get("policy")),
                "capacity": capacity,
                "policy": params.get("policy") or cache.settings.policy,
            }
        else:
            out = {"folded": cache.fold_counters()}
        _check_token(token)  # still the newest token after the work: report it (the work itself was idempotent)
    else:
        return {"error": f"unknown op {op!r}"}
    out["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return out


@control_command(args=[("op", str), ("params", dict), ("token", int)], signature="<op> [params] [token]")
def reprise_cache(state, op, params=None, token=0):
    try:
        return run_op(op, params or {}, token)
    except StaleToken as exc:
        log.warning("refused %s: %s", op, exc)
        return {"refused": str(exc)}
    except Exception as exc:  # a failing op must not take the node down
        log.exception("cache op %s failed", op)
        return {"error": f"{type(exc).__name__}: {exc}"}


assert CONTROL_COMMAND == reprise_cache.__name__

# --- the same operations as Celery tasks, for other services ----------------------------------
app = get_app()


@app.task(name="reprise.cache.invalidate")
def invalidate_task(model=None, tenant=None, prompt_prefix=None):
    return CacheAdmin().invalidate(model=model, tenant=tenant, prompt_prefix=prompt_prefix)


@app.task(name="reprise.cache.purge")
def purge_task(older_than_s, model=None):
    return CacheAdmin().purge(float(older_than_s), model=model)


@app.task(name="reprise.cache.evict")
def evict_task(to_fraction=None, to_entries=None, policy=None):
    return CacheAdmin().evict(to_fraction=to_fraction, to_entries=to_entries, policy=policy)


@app.task(name="reprise.cache.stats")
def stats_task():
    return CacheAdmin().stats()
