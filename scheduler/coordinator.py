"""The coordinator: one active leader (others on standby) that keeps every node's cache in shape.

Leadership is a Redis lease (SET NX PX, renewed by a compare-and-set script); each new leader takes
a fencing token (INCR). Every destructive duty carries that token and nodes refuse a stale one, so
a paused or partitioned ex-leader can never delete anything once a successor exists.

Duties of the leader, each idempotent and rate-limited: TTL sweeps, GC of old cache generations,
capacity enforcement with the configured policy from the hit counters in Redis, and folding the
counters into the cache payloads (where eviction still finds them if the counters are lost). While
a duty waits for slow nodes the leader keeps renewing its lease, so a slow node never moves the
leadership.

    reprise coordinator run      # leader or standby, until stopped
    reprise coordinator status   # who leads, token, lease, members, last sweeps, generations
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid

import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.cache_admin import CacheAdmin
from scheduler.redis_conn import replicated_write
from scheduler.settings import get_settings

log = logging.getLogger("reprise.coordinator")

RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPRISE_COORDINATOR_", extra="ignore")

    lease_s: float = Field(
        3.0, gt=0, description="Leader lease; a standby takes over within about this long of the leader's death."
    )
    sweep_interval_s: float = Field(60.0, gt=0, description="Least time between two rounds of the leader's duties.")
    evict_to_fraction: float = Field(
        1.0, gt=0, le=1, description="Capacity enforcement evicts down to this fraction of each node's capacity."
    )
    metrics_port: int = Field(
        9200,
        ge=0,
        description="Prometheus metrics port of the coordinator (0 = off); away from the workers' 9101+ range.",
    )
    broadcast_timeout_s: float = Field(
        20.0, gt=0, description="How long a duty waits for the nodes' replies (the leader renews its lease meanwhile)."
    )


class Lease:
    def __init__(self, r: redis.Redis, prefix: str, member: str, lease_s: float):
        self.r, self.prefix, self.member, self.lease_ms = r, prefix, member, int(lease_s * 1000)
        self.key = f"{prefix}:coordinator:leader"
        self.token_key = f"{prefix}:coordinator:token"
        self.token: int | None = None
        self._renew = r.register_script(RENEW)
        self._release = r.register_script(RELEASE)

    def _value(self) -> str:
        return f"{self.member}|{self.token}"

    def hold(self) -> bool:
        """Acquire or renew; True while this member leads."""
        if self.token is not None and self._renew(keys=[self.key], args=[self._value(), self.lease_ms]):
            return True
        self.token = None
        # Take a token only when the lease is free, so tokens grow by one per leader change.
        if self.r.set(self.key, f"{self.member}|pending", nx=True, px=self.lease_ms):
            # Under Sentinel the token reaches a replica before it is used: a failover never hands out a token
            # again (NotReplicated, a RedisError: no token this round; the pending lease expires).
            self.token = int(replicated_write(self.r, lambda pipe: pipe.incr(self.token_key))[0])
            self.r.set(self.key, self._value(), px=self.lease_ms)
            self.r.incr(f"{self.prefix}:coordinator:leader-changes")
            return True
        return False

    def release(self) -> None:
        if self.token is not None:
            self._release(keys=[self.key], args=[self._value()])
            self.token = None


class Coordinator:
    def __init__(
        self, settings: CoordinatorSettings | None = None, admin: CacheAdmin | None = None, member: str | None = None
    ):
        self.settings = settings or CoordinatorSettings()
        self.admin = admin or CacheAdmin()
        self.r = self.admin.r
        self.prefix = self.admin.prefix
        self.member = member or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease = Lease(self.r, self.prefix, self.member, self.settings.lease_s)
        self.stopped = threading.Event()
        self.last_round = 0.0
        self.metrics = None

    def _leading_with(self, token: int | None) -> bool:
        """Renew the lease; True while this member still leads under the same token."""
        return self.lease.hold() and self.lease.token == token

    def _broadcast_renewing(self, op: str, params: dict, token: int | None) -> dict | str:
        """Broadcast one duty and wait for the replies (up to broadcast_timeout_s), renewing the lease
        every lease_s / 3 meanwhile: a slow node must not cost this member its leadership. Returns the
        replies, or "lost leadership" / "stopped" when the wait was given up."""
        done = threading.Event()
        outcome: dict = {}

        def call() -> None:
            try:
                outcome["replies"] = self.admin.broadcast(
                    op, params, token=token, timeout=self.settings.broadcast_timeout_s
                )
            except BaseException as exc:  # handed to the waiting thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=call, name=f"reprise-duty-{op}", daemon=True).start()
        while not done.wait(self.settings.lease_s / 3):
            if self.stopped.is_set():
                return "stopped"
            if not self._leading_with(token):  # the replies, if any, are no longer this leader's business
                return "lost leadership"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["replies"]

    def round_of_duties(self) -> dict:
        """One pass of every duty on every node, with this leader's token."""
        token = self.lease.token
        results = {}
        for op in ("expire", "gc", "evict", "fold"):
            if not self._leading_with(token):  # lost the lease mid-round: stop at once
                results[op] = "lost leadership"
                break
            params = {"to_fraction": self.settings.evict_to_fraction} if op == "evict" else {}
            replies = self._broadcast_renewing(op, params, token)
            if isinstance(replies, str):
                results[op] = replies
                break
            results[op] = replies
            self.r.hincrby(f"{self.prefix}:coordinator:sweeps", op, 1)
            if self.metrics:
                self.metrics.observe_duty(op, replies)
        self.r.hset(
            f"{self.prefix}:coordinator:last-round",
            mapping={
                "at": time.time(),
                "member": self.member,
                "token": token or 0,
                "results": json.dumps(results, default=str)[:10000],
            },
        )
        return results

    def run(self) -> None:
        log.info(
            "coordinator %s starting (lease %.1fs, duties every %.0fs)",
            self.member,
            self.settings.lease_s,
            self.settings.sweep_interval_s,
        )
        leading = False
        while not self.stopped.is_set():
            try:
                self.r.set(
                    f"{self.prefix}:coordinator:member:{self.member}",
                    json.dumps({"pid": os.getpid(), "at": time.time()}),
                    px=int(self.settings.lease_s * 3000),
                )
                now_leading = self.lease.hold()
                if now_leading != leading:
                    log.info(
                        "%s is now %s (token %s)", self.member, "LEADER" if now_leading else "standby", self.lease.token
                    )
                    leading = now_leading
                if self.metrics:
                    self.metrics.update(self, leading)
                if leading and time.monotonic() - self.last_round >= self.settings.sweep_interval_s:
                    self.last_round = time.monotonic()
                    results = self.round_of_duties()
                    log.info("duties done: %s", json.dumps(results, default=str)[:500])
            except redis.RedisError as exc:
                log.warning("redis unavailable: %s", exc)
                leading = False
            self.stopped.wait(self.settings.lease_s / 3)
        self.lease.release()

    def stop(self, *_) -> None:
        self.stopped.set()


def status(admin: CacheAdmin | None = None) -> dict:
    admin = admin or CacheAdmin()
    r, p = admin.r, admin.prefix
    leader = r.get(f"{p}:coordinator:leader")
    members = [k.decode().rsplit(":", 1)[1] for k in r.scan_iter(f"{p}:coordinator:member:*")]
    last = {k.decode(): v.decode() for k, v in r.hgetall(f"{p}:coordinator:last-round").items()}
    return {
        "leader": leader.decode().split("|")[0] if leader else None,
        "token": admin.current_token(),
        "lease_ms_left": r.pttl(f"{p}:coordinator:leader"),
        "members": sorted(members),
        "leader_changes": int(r.get(f"{p}:coordinator:leader-changes") or 0),
        "sweeps": {k.decode(): int(v) for k, v in r.hgetall(f"{p}:coordinator:sweeps").items()},
        "last_round_at": float(last["at"]) if "at" in last else None,
        "generations": admin.registry.generations(),
    }


class CoordinatorMetrics:
    """Prometheus metrics of the coordinator (generation per model, entries, bytes, evictions, sweeps, leadership)."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.generation = Gauge(
            "reprise_cache_generation", "Cache generation per model", ["model"], registry=self.registry
        )
        self.entries = Gauge("reprise_cache_entries", "Entries in the cache, all nodes", registry=self.registry)
        self.bytes = Gauge("reprise_cache_bytes", "Approximate bytes in the cache, all nodes", registry=self.registry)
        self.evictions = Counter(
            "reprise_evictions_total", "Entries or states evicted", ["policy"], registry=self.registry
        )
        self.sweeps = Counter("reprise_sweeps_total", "Duty rounds run", ["kind"], registry=self.registry)
        self.leader_changes = Gauge(
            "reprise_leader_changes_total", "Leader changes seen in Redis", registry=self.registry
        )
        self.is_leader = Gauge(
            "reprise_coordinator_is_leader", "1 while this coordinator leads", registry=self.registry
        )
        self._last_stats = 0.0
        self._stats_running = threading.Event()
        start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def update(self, coordinator: Coordinator, leading: bool) -> None:
        self.is_leader.set(1 if leading else 0)
        r, p = coordinator.r, coordinator.prefix
        self.leader_changes.set(int(r.get(f"{p}:coordinator:leader-changes") or 0))
        for model, gen in coordinator.admin.registry.generations().items():
            self.generation.labels(model).set(gen)
        if leading and time.monotonic() - self._last_stats > 30 and not self._stats_running.is_set():
            self._last_stats = time.monotonic()
            self._stats_running.set()
            # The stats broadcast waits for every node (up to 10 s when one does not answer): off the lease
            # loop, so the leader keeps renewing its lease and its is_leader gauge stays true meanwhile.
            threading.Thread(target=self._refresh_stats, args=(coordinator,), daemon=True).start()

    def _refresh_stats(self, coordinator: Coordinator) -> None:
        try:
            totals = coordinator.admin.stats()["totals"]
            self.entries.set(totals["entries"])
            self.bytes.set(totals["approx_bytes"])
        except Exception as exc:  # no node answered, Redis away: the next refresh tries again
            log.info("coordinator stats not refreshed: %s", exc)
        finally:
            self._stats_running.clear()

    def observe_duty(self, op: str, replies: dict) -> None:
        self.sweeps.labels(op).inc()
        if op == "evict":
            for reply in replies.values():
                if isinstance(reply, dict) and reply.get("evicted"):
                    self.evictions.labels(reply.get("policy", "?")).inc(reply["evicted"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reprise coordinator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("action", choices=["run", "status"], nargs="?", default="run")
    p.add_argument("--once", action="store_true", help="run: one round of duties if this member can lead, then exit")
    p.add_argument("--loglevel", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.loglevel.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.action == "status":
        print(json.dumps(status(), indent=2))
        return 0
    settings = CoordinatorSettings()
    coordinator = Coordinator(settings)
    if args.once:
        if not coordinator.lease.hold():
            print("another coordinator leads; nothing done", file=sys.stderr)
            return 1
        print(json.dumps(coordinator.round_of_duties(), indent=2, default=str))
        coordinator.lease.release()
        return 0
    if settings.metrics_port:
        try:
            coordinator.metrics = CoordinatorMetrics(settings.metrics_port)
        except OSError as exc:
            log.warning("metrics port %d unavailable (%s): metrics off", settings.metrics_port, exc)
    signal.signal(signal.SIGTERM, coordinator.stop)
    signal.signal(signal.SIGINT, coordinator.stop)
    from scheduler.redis_conn import safe_url

    print(
        f"reprise coordinator {coordinator.member}: running (Redis {safe_url(get_settings().redis_url)})",
        flush=True,
    )
    coordinator.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
